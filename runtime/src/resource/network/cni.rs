//! A small CNI client: finds the pod network's configuration and runs its plugins (ADD, CHECK,
//! DEL) the way libcni does — plugin binaries looked up by `type`, the network's `name` and
//! `cniVersion` injected into each plugin's config, the previous plugin's result passed on as
//! `prevResult`, and runtime capabilities (`portMappings`, `bandwidth`) given only to plugins
//! that declare them. No maintained Rust crate implements the runtime side of CNI.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

/// How long one plugin may run.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes of a plugin's stdout kept (a result is a few KiB).
const MAX_PLUGIN_OUTPUT: u64 = 1 << 20;
/// Configuration files larger than this are not read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Errors of the CNI client.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("no CNI network configuration in {0}")]
    NoConfig(PathBuf),
    #[error("reading CNI configuration directory {path}: {source}")]
    ReadDir { path: PathBuf, source: std::io::Error },
    #[error("CNI configuration {path}: {reason}")]
    BadConfig { path: PathBuf, reason: String },
    #[error("CNI plugin {plugin:?} not found in {dirs}")]
    PluginNotFound { plugin: String, dirs: String },
    #[error("running CNI plugin {plugin}: {source}")]
    Spawn { plugin: String, source: std::io::Error },
    #[error("CNI plugin {plugin} did not finish within {PLUGIN_TIMEOUT:?}")]
    Timeout { plugin: String },
    #[error("CNI plugin {plugin} {command} failed (code {code}): {msg}{details}")]
    Plugin { plugin: String, command: &'static str, code: i64, msg: String, details: String },
    #[error("CNI plugin {plugin} {command} printed a result that is not JSON: {source}")]
    BadResult { plugin: String, command: &'static str, source: serde_json::Error },
}

pub type Result<T> = std::result::Result<T, CniError>;

/// A network configuration list (a `.conf` file is a list of one).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NetworkList {
    pub name: String,
    pub cni_version: String,
    pub disable_check: bool,
    pub plugins: Vec<Map<String, Value>>,
    /// The file it came from.
    pub source: PathBuf,
}

impl NetworkList {
    /// Parses a `.conflist` (`plugins: [...]`) or a single-plugin `.conf`.
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let bad = |reason: String| CniError::BadConfig { path: path.to_path_buf(), reason };
        let value: Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let Value::Object(mut top) = value else { return Err(bad("not a JSON object".into())) };
        let name = match top.get("name") {
            Some(Value::String(n)) if !n.is_empty() => n.clone(),
            _ => return Err(bad("no network name".into())),
        };
        let cni_version = match top.get("cniVersion") {
            Some(Value::String(v)) if !v.is_empty() => v.clone(),
            _ => return Err(bad("no cniVersion".into())),
        };
        let disable_check = top.get("disableCheck").and_then(Value::as_bool).unwrap_or(false);
        let plugins = match top.remove("plugins") {
            Some(Value::Array(list)) => list
                .into_iter()
                .map(|p| match p {
                    Value::Object(p) => Ok(p),
                    _ => Err(bad("a plugin entry is not an object".into())),
                })
                .collect::<Result<Vec<_>>>()?,
            Some(_) => return Err(bad("plugins is not a list".into())),
            None => vec![top],
        };
        if plugins.is_empty() {
            return Err(bad("the plugin list is empty".into()));
        }
        for plugin in &plugins {
            match plugin.get("type") {
                Some(Value::String(t)) if is_plugin_name(t) => {}
                _ => return Err(bad("a plugin has no valid type".into())),
            }
        }
        Ok(Self { name, cni_version, disable_check, plugins, source: path.to_path_buf() })
    }

    /// The first valid configuration in `dir`, by file name, as libcni picks it.
    pub fn load_first(dir: &Path) -> Result<Self> {
        let entries = std::fs::read_dir(dir)
            .map_err(|source| CniError::ReadDir { path: dir.to_path_buf(), source })?;
        let mut files: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                matches!(p.extension().and_then(|e| e.to_str()), Some("conflist" | "conf" | "json"))
            })
            .collect();
        files.sort();
        let mut last_error = None;
        for path in files {
            match read_small(&path).and_then(|text| Self::parse(&path, &text)) {
                Ok(list) => return Ok(list),
                Err(e) => {
                    tracing::debug!(path = %path.display(), error = %e, "skipping CNI config");
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| CniError::NoConfig(dir.to_path_buf())))
    }

    /// Plugin types, in order.
    pub fn plugin_types(&self) -> impl Iterator<Item = &str> {
        self.plugins.iter().filter_map(|p| p.get("type").and_then(Value::as_str))
    }

    /// libcni: CHECK exists from CNI 0.4.0 on.
    fn supports_check(&self) -> bool {
        !self.disable_check
            && !self.cni_version.starts_with("0.1")
            && !matches!(self.cni_version.as_str(), "0.2.0" | "0.3.0" | "0.3.1")
    }
}

fn read_small(path: &Path) -> Result<String> {
    let bad = |reason: String| CniError::BadConfig { path: path.to_path_buf(), reason };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(bad(format!("larger than {MAX_CONFIG_BYTES} bytes")));
    }
    std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))
}

/// A plugin `type` is a file name, never a path.
fn is_plugin_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.starts_with('.')
}

/// One attachment of a pod to the network: what every plugin call is told.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Attachment {
    pub container_id: String,
    pub netns: PathBuf,
    pub ifname: String,
    /// CNI_ARGS, in order.
    pub args: Vec<(String, String)>,
    /// Runtime capabilities by name (`portMappings`, `bandwidth`), given to plugins that ask.
    pub capabilities: BTreeMap<String, Value>,
}

impl Attachment {
    fn cni_args(&self) -> String {
        std::iter::once("IgnoreUnknown=1".to_string())
            .chain(self.args.iter().map(|(k, v)| format!("{k}={}", v.replace([';', '='], "_"))))
            .collect::<Vec<_>>()
            .join(";")
    }
}

/// Runs plugins from a list of directories.
#[derive(Debug, Clone)]
pub struct Plugins {
    pub bin_dirs: Vec<PathBuf>,
}

impl Plugins {
    /// The binary of plugin `name`: the first directory that has it.
    pub fn find(&self, name: &str) -> Result<PathBuf> {
        let not_found = || CniError::PluginNotFound {
            plugin: name.to_string(),
            dirs: self
                .bin_dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(":"),
        };
        if !is_plugin_name(name) {
            return Err(not_found());
        }
        self.bin_dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()).ok_or_else(not_found)
    }

    /// Every plugin of `list` is installed.
    pub fn check_installed(&self, list: &NetworkList) -> Result<()> {
        list.plugin_types().try_for_each(|t| self.find(t).map(drop))
    }

    /// ADD through the whole chain; the last plugin's result is the attachment's result.
    pub async fn add(&self, list: &NetworkList, att: &Attachment) -> Result<Value> {
        let mut prev: Option<Value> = None;
        for plugin in &list.plugins {
            let result = self.exec(list, plugin, att, "ADD", prev.as_ref()).await?;
            prev = Some(result.unwrap_or_else(|| json!({"cniVersion": list.cni_version})));
        }
        Ok(prev.unwrap_or(Value::Null))
    }

    /// CHECK through the chain with the attachment's result (skipped where CHECK does not
    /// exist or is disabled).
    pub async fn check(&self, list: &NetworkList, att: &Attachment, result: &Value) -> Result<()> {
        if !list.supports_check() {
            return Ok(());
        }
        for plugin in &list.plugins {
            self.exec(list, plugin, att, "CHECK", Some(result)).await?;
        }
        Ok(())
    }

    /// DEL in reverse order. Every plugin runs even when one fails (so one broken plugin does
    /// not strand the others' state); the first failure is returned.
    pub async fn del(
        &self,
        list: &NetworkList,
        att: &Attachment,
        result: Option<&Value>,
    ) -> Result<()> {
        let mut first_error = None;
        for plugin in list.plugins.iter().rev() {
            if let Err(e) = self.exec(list, plugin, att, "DEL", result).await {
                tracing::warn!(error = %e, "CNI DEL");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn exec(
        &self,
        list: &NetworkList,
        plugin: &Map<String, Value>,
        att: &Attachment,
        command: &'static str,
        prev: Option<&Value>,
    ) -> Result<Option<Value>> {
        let name = plugin.get("type").and_then(Value::as_str).unwrap_or_default().to_string();
        let binary = self.find(&name)?;
        let stdin = plugin_stdin(list, plugin, att, prev);
        let output = self.run(&binary, &name, command, att, stdin).await?;
        parse_output(&name, command, output)
    }

    async fn run(
        &self,
        binary: &Path,
        name: &str,
        command: &'static str,
        att: &Attachment,
        stdin: Vec<u8>,
    ) -> Result<PluginOutput> {
        let spawn_err = |source| CniError::Spawn { plugin: name.to_string(), source };
        let cni_path =
            self.bin_dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(":");
        let mut child = Command::new(binary)
            .env_clear()
            .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &att.container_id)
            .env("CNI_NETNS", &att.netns)
            .env("CNI_IFNAME", &att.ifname)
            .env("CNI_ARGS", att.cni_args())
            .env("CNI_PATH", cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_err)?;
        let mut input =
            child.stdin.take().ok_or_else(|| spawn_err(std::io::Error::other("no stdin")))?;
        let stdout =
            child.stdout.take().ok_or_else(|| spawn_err(std::io::Error::other("no stdout")))?;
        let stderr =
            child.stderr.take().ok_or_else(|| spawn_err(std::io::Error::other("no stderr")))?;
        let run = async {
            // A plugin that exits without reading its config is not an error of ours.
            let _ = input.write_all(&stdin).await;
            drop(input);
            let mut out = Vec::new();
            let mut err = Vec::new();
            let (mut stdout, mut stderr) =
                (stdout.take(MAX_PLUGIN_OUTPUT), stderr.take(MAX_PLUGIN_OUTPUT));
            let (r1, r2) = tokio::join!(stdout.read_to_end(&mut out), stderr.read_to_end(&mut err));
            r1.and(r2).map_err(spawn_err)?;
            let status = child.wait().await.map_err(spawn_err)?;
            Ok(PluginOutput { success: status.success(), stdout: out, stderr: err })
        };
        match tokio::time::timeout(PLUGIN_TIMEOUT, run).await {
            Ok(result) => result,
            Err(_) => Err(CniError::Timeout { plugin: name.to_string() }),
        }
    }
}

struct PluginOutput {
    success: bool,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

/// The config a plugin reads on stdin.
fn plugin_stdin(
    list: &NetworkList,
    plugin: &Map<String, Value>,
    att: &Attachment,
    prev: Option<&Value>,
) -> Vec<u8> {
    let mut conf = plugin.clone();
    conf.insert("name".into(), Value::String(list.name.clone()));
    conf.insert("cniVersion".into(), Value::String(list.cni_version.clone()));
    let wanted: Vec<&String> = match plugin.get("capabilities") {
        Some(Value::Object(caps)) => {
            caps.iter().filter(|(_, on)| on.as_bool() == Some(true)).map(|(k, _)| k).collect()
        }
        _ => Vec::new(),
    };
    let runtime_config: Map<String, Value> = wanted
        .into_iter()
        .filter_map(|k| att.capabilities.get(k).map(|v| (k.clone(), v.clone())))
        .collect();
    if !runtime_config.is_empty() {
        conf.insert("runtimeConfig".into(), Value::Object(runtime_config));
    }
    if let Some(prev) = prev {
        conf.insert("prevResult".into(), prev.clone());
    }
    serde_json::to_vec(&Value::Object(conf)).unwrap_or_default()
}

/// A plugin's answer: its result (ADD), nothing (CHECK, DEL) or its error object.
fn parse_output(name: &str, command: &'static str, output: PluginOutput) -> Result<Option<Value>> {
    if !output.success {
        let err: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        let msg = err.get("msg").and_then(Value::as_str).map(str::to_string).unwrap_or_else(|| {
            if stderr.is_empty() {
                String::from_utf8_lossy(&output.stdout).trim().to_string()
            } else {
                stderr.clone()
            }
        });
        let details = match err.get("details").and_then(Value::as_str) {
            Some(d) if !d.is_empty() => format!(" ({d})"),
            _ => String::new(),
        };
        return Err(CniError::Plugin {
            plugin: name.to_string(),
            command,
            code: err.get("code").and_then(Value::as_i64).unwrap_or(-1),
            msg,
            details,
        });
    }
    if command != "ADD" || output.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(&output.stdout).map(Some).map_err(|source| CniError::BadResult {
        plugin: name.to_string(),
        command,
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const BRIDGE: &str = r#"{"cniVersion":"1.0.0","name":"podnet","plugins":[
        {"type":"bridge","bridge":"cni0","ipam":{"type":"host-local","subnet":"10.1.0.0/24"}},
        {"type":"portmap","capabilities":{"portMappings":true}}]}"#;

    fn list() -> NetworkList {
        NetworkList::parse(Path::new("/x/10.conflist"), BRIDGE).unwrap()
    }

    #[test]
    fn conflist_and_single_conf_parse() {
        let l = list();
        assert_eq!(l.name, "podnet");
        assert_eq!(l.plugin_types().collect::<Vec<_>>(), ["bridge", "portmap"]);
        assert!(l.supports_check());
        let single = NetworkList::parse(
            Path::new("/x/99.conf"),
            r#"{"cniVersion":"0.3.1","name":"lo","type":"loopback"}"#,
        )
        .unwrap();
        assert_eq!(single.plugin_types().collect::<Vec<_>>(), ["loopback"]);
        assert!(!single.supports_check());
    }

    #[test]
    fn bad_configs_are_refused() {
        for text in [
            "",
            "[]",
            r#"{"cniVersion":"1.0.0","plugins":[{"type":"bridge"}]}"#,
            r#"{"name":"n","plugins":[{"type":"bridge"}]}"#,
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[]}"#,
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"../../bin/sh"}]}"#,
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[3]}"#,
        ] {
            assert!(NetworkList::parse(Path::new("/x"), text).is_err(), "{text}");
        }
    }

    #[test]
    fn first_valid_file_by_name_wins() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("05-broken.conflist"), "{").unwrap();
        std::fs::write(dir.path().join("20-other.conflist"), BRIDGE.replace("podnet", "other"))
            .unwrap();
        std::fs::write(dir.path().join("10-pod.conflist"), BRIDGE).unwrap();
        std::fs::write(dir.path().join("00-notes.txt"), "x").unwrap();
        assert_eq!(NetworkList::load_first(dir.path()).unwrap().name, "podnet");
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(NetworkList::load_first(empty.path()), Err(CniError::NoConfig(_))));
    }

    #[test]
    fn stdin_carries_name_version_prev_result_and_only_declared_capabilities() {
        let l = list();
        let mut att = Attachment::default();
        att.capabilities.insert("portMappings".into(), json!([{"hostPort": 8080}]));
        att.capabilities.insert("bandwidth".into(), json!({"ingressRate": 1}));
        let prev = json!({"cniVersion":"1.0.0","ips":[]});
        let bridge: Value =
            serde_json::from_slice(&plugin_stdin(&l, &l.plugins[0], &att, None)).unwrap();
        assert_eq!(bridge["name"], "podnet");
        assert_eq!(bridge["cniVersion"], "1.0.0");
        assert!(bridge.get("runtimeConfig").is_none());
        assert!(bridge.get("prevResult").is_none());
        let portmap: Value =
            serde_json::from_slice(&plugin_stdin(&l, &l.plugins[1], &att, Some(&prev))).unwrap();
        assert_eq!(portmap["runtimeConfig"], json!({"portMappings": [{"hostPort": 8080}]}));
        assert_eq!(portmap["prevResult"], prev);
    }

    #[test]
    fn cni_args_cannot_inject_keys() {
        let att = Attachment {
            args: vec![("K8S_POD_NAME".into(), "a;b=c".into())],
            ..Default::default()
        };
        assert_eq!(att.cni_args(), "IgnoreUnknown=1;K8S_POD_NAME=a_b_c");
    }

    fn fake_plugin(dir: &Path, name: &str, script: &str) {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[tokio::test]
    async fn chain_passes_results_on_and_del_runs_every_plugin_in_reverse() {
        let bin = tempfile::tempdir().unwrap();
        let log = bin.path().join("log");
        let log_s = log.display();
        // bridge answers a result; portmap echoes prevResult's marker; both log their calls.
        fake_plugin(
            bin.path(),
            "bridge",
            &format!(
                "cat > /dev/null; echo \"bridge $CNI_COMMAND $CNI_IFNAME\" >> {log_s}; \
                 [ \"$CNI_COMMAND\" = ADD ] && echo '{{\"cniVersion\":\"1.0.0\",\"ips\":[{{\"address\":\"10.1.0.2/24\"}}]}}'; exit 0"
            ),
        );
        fake_plugin(
            bin.path(),
            "portmap",
            &format!(
                "in=$(cat); echo \"portmap $CNI_COMMAND\" >> {log_s}; \
                 if [ \"$CNI_COMMAND\" = DEL ]; then echo '{{\"code\":11,\"msg\":\"boom\"}}'; exit 1; fi; \
                 case \"$CNI_COMMAND$in\" in ADD*'\"prevResult\":{{\"cniVersion\":\"1.0.0\",\"ips\":[{{\"address\":\"10.1.0.2/24\"}}]}}'*|CHECK*) ;; *) exit 1;; esac; \
                 [ \"$CNI_COMMAND\" = ADD ] && echo '{{\"cniVersion\":\"1.0.0\",\"ips\":[{{\"address\":\"10.1.0.3/24\"}}]}}'; exit 0"
            ),
        );
        let plugins = Plugins { bin_dirs: vec![PathBuf::from("/nonexistent"), bin.path().into()] };
        let att = Attachment { ifname: "eth0".into(), ..Default::default() };
        let l = list();
        let result = plugins.add(&l, &att).await.unwrap();
        // portmap only answered because it was given bridge's result.
        assert_eq!(result["ips"][0]["address"], "10.1.0.3/24");
        plugins.check(&l, &att, &result).await.unwrap();
        let err = plugins.del(&l, &att, Some(&result)).await.unwrap_err();
        assert!(matches!(err, CniError::Plugin { code: 11, .. }), "{err}");
        let calls = std::fs::read_to_string(&log).unwrap();
        assert_eq!(
            calls,
            "bridge ADD eth0\nportmap ADD\nbridge CHECK eth0\nportmap CHECK\nportmap DEL\nbridge DEL eth0\n"
        );
    }

    #[tokio::test]
    async fn missing_plugin_and_garbage_result_are_errors() {
        let bin = tempfile::tempdir().unwrap();
        let plugins = Plugins { bin_dirs: vec![bin.path().into()] };
        assert!(matches!(plugins.check_installed(&list()), Err(CniError::PluginNotFound { .. })));
        fake_plugin(bin.path(), "bridge", "cat >/dev/null; echo not-json");
        fake_plugin(bin.path(), "portmap", "cat >/dev/null");
        plugins.check_installed(&list()).unwrap();
        let err = plugins.add(&list(), &Attachment::default()).await.unwrap_err();
        assert!(matches!(err, CniError::BadResult { .. }), "{err}");
    }
}
