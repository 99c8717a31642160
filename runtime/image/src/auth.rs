//! Registry credentials: from the CRI `AuthConfig` fields or from a docker `config.json`.

use std::collections::HashMap;
use std::path::Path;

use base64::Engine;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

use crate::Error;

/// Credentials for one registry.
#[derive(Clone, PartialEq, Eq)]
pub enum RegistryCredentials {
    /// HTTP basic auth, or username/password exchanged for a bearer token when the registry
    /// asks for one (the pull follows the `WWW-Authenticate` challenge).
    Basic {
        /// User name.
        username: String,
        /// Password.
        password: String,
    },
    /// An identity (refresh) token: sent as the password of basic auth on the token endpoint,
    /// with `<token>` as user name unless one is given.
    IdentityToken {
        /// User name, possibly empty.
        username: String,
        /// The token.
        token: String,
    },
    /// A bearer token sent to the registry as is.
    RegistryToken(String),
}

impl std::fmt::Debug for RegistryCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Self::IdentityToken { username, .. } => {
                write!(f, "IdentityToken({username}, <redacted>)")
            }
            Self::RegistryToken(_) => write!(f, "RegistryToken(<redacted>)"),
        }
    }
}

impl RegistryCredentials {
    /// Builds credentials from the CRI `AuthConfig` (or docker config) fields; empty strings
    /// mean "not given". `auth` is base64 of `user:password`. None when nothing is given.
    pub fn from_fields(
        username: &str,
        password: &str,
        auth: &str,
        identity_token: &str,
        registry_token: &str,
    ) -> Result<Option<Self>, Error> {
        if !registry_token.is_empty() {
            return Ok(Some(Self::RegistryToken(registry_token.to_owned())));
        }
        let (mut username, mut password) = (username.to_owned(), password.to_owned());
        if !auth.is_empty() {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|e| Error::InvalidCredentials(format!("auth is not base64: {e}")))?;
            let decoded = String::from_utf8(decoded)
                .map_err(|_| Error::InvalidCredentials("auth is not UTF-8".to_owned()))?;
            let (user, pass) = decoded.split_once(':').ok_or_else(|| {
                Error::InvalidCredentials("auth is not base64 of user:password".to_owned())
            })?;
            username = user.to_owned();
            password = pass.to_owned();
        }
        if !identity_token.is_empty() {
            return Ok(Some(Self::IdentityToken { username, token: identity_token.to_owned() }));
        }
        if username.is_empty() && password.is_empty() {
            return Ok(None);
        }
        Ok(Some(Self::Basic { username, password }))
    }

    pub(crate) fn to_registry_auth(&self) -> RegistryAuth {
        match self {
            Self::Basic { username, password } => {
                RegistryAuth::Basic(username.clone(), password.clone())
            }
            Self::IdentityToken { username, token } => {
                let username =
                    if username.is_empty() { "<token>".to_owned() } else { username.clone() };
                RegistryAuth::Basic(username, token.clone())
            }
            Self::RegistryToken(token) => RegistryAuth::Bearer(token.clone()),
        }
    }
}

#[derive(Deserialize, Default)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, DockerAuthEntry>,
}

#[derive(Deserialize, Default)]
struct DockerAuthEntry {
    #[serde(default)]
    auth: String,
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default, rename = "identitytoken")]
    identity_token: String,
    #[serde(default, rename = "registrytoken")]
    registry_token: String,
}

/// `https://index.docker.io/v1/` → `docker.io`; `host:port/path` → `host:port`.
fn normalize_registry(key: &str) -> String {
    let without_scheme =
        key.strip_prefix("https://").or_else(|| key.strip_prefix("http://")).unwrap_or(key);
    let host = without_scheme.split('/').next().unwrap_or(without_scheme);
    match host {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_owned()
        }
        other => other.to_owned(),
    }
}

/// The credentials a docker `config.json` holds for `registry` (as a reference names it, e.g.
/// `docker.io` or `127.0.0.1:5000`). A missing file means no credentials.
pub(crate) fn from_docker_config(
    path: &Path,
    registry: &str,
) -> Result<Option<RegistryCredentials>, Error> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(Error::ReadDockerConfig { path: path.to_owned(), source }),
    };
    let config: DockerConfig = serde_json::from_slice(&bytes)
        .map_err(|source| Error::ParseDockerConfig { path: path.to_owned(), source })?;
    let wanted = normalize_registry(registry);
    for (key, entry) in &config.auths {
        if normalize_registry(key) == wanted {
            return RegistryCredentials::from_fields(
                &entry.username,
                &entry.password,
                &entry.auth,
                &entry.identity_token,
                &entry.registry_token,
            );
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_cri_auth_fields() {
        let auth = base64::engine::general_purpose::STANDARD.encode("bob:pw:with:colons");
        let creds = RegistryCredentials::from_fields("", "", &auth, "", "").unwrap().unwrap();
        assert_eq!(
            creds,
            RegistryCredentials::Basic {
                username: "bob".into(),
                password: "pw:with:colons".into()
            }
        );
        assert!(RegistryCredentials::from_fields("", "", "", "", "").unwrap().is_none());
        assert!(RegistryCredentials::from_fields("", "", "!!", "", "").is_err());
        assert_eq!(
            RegistryCredentials::from_fields("u", "p", "", "", "tok").unwrap(),
            Some(RegistryCredentials::RegistryToken("tok".into()))
        );
    }

    #[test]
    fn reads_docker_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:secret");
        std::fs::write(
            &path,
            format!(
                r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{auth}"}},
                "127.0.0.1:5000":{{"username":"u","password":"p"}}}}}}"#
            ),
        )
        .unwrap();
        assert_eq!(
            from_docker_config(&path, "docker.io").unwrap(),
            Some(RegistryCredentials::Basic {
                username: "alice".into(),
                password: "secret".into()
            })
        );
        assert!(from_docker_config(&path, "127.0.0.1:5000").unwrap().is_some());
        assert!(from_docker_config(&path, "quay.io").unwrap().is_none());
        assert!(from_docker_config(&dir.path().join("none"), "quay.io").unwrap().is_none());
    }
}
