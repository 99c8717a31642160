//! Backends by name. New pods go to the default backend; a recovered pod goes to the backend
//! its record names, which is built on first use if it is not the default (a daemon whose
//! default changed still reaches, and stops, the VMs the previous one started).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{Hypervisor, HypervisorError, Result};

type Factory = Box<dyn Fn() -> Result<Arc<dyn Hypervisor>> + Send + Sync>;

pub struct Registry {
    default: Arc<dyn Hypervisor>,
    /// Built backends.
    built: Mutex<HashMap<String, Arc<dyn Hypervisor>>>,
    /// How to build the others.
    factories: HashMap<String, Factory>,
}

impl Registry {
    /// A registry whose default (and so far only) backend is `default`.
    pub fn new(default: Arc<dyn Hypervisor>) -> Self {
        let built = HashMap::from([(default.name().to_string(), default.clone())]);
        Self { default, built: Mutex::new(built), factories: HashMap::new() }
    }

    /// Adds a backend that is built when a record first names it.
    pub fn with_factory(
        mut self,
        name: &str,
        factory: impl Fn() -> Result<Arc<dyn Hypervisor>> + Send + Sync + 'static,
    ) -> Self {
        self.factories.insert(name.to_string(), Box::new(factory));
        self
    }

    /// The backend new pods run on.
    pub fn default_backend(&self) -> Arc<dyn Hypervisor> {
        self.default.clone()
    }

    /// The backend called `name`, building it if needed.
    pub fn get(&self, name: &str) -> Result<Arc<dyn Hypervisor>> {
        let mut built = self.built.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(backend) = built.get(name) {
            return Ok(backend.clone());
        }
        let factory = self.factories.get(name).ok_or_else(|| {
            HypervisorError::InvalidConfig(format!("no hypervisor backend named {name:?}"))
        })?;
        let backend = factory()?;
        built.insert(name.to_string(), backend.clone());
        Ok(backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::fake::FakeHypervisor;

    #[test]
    fn backends_are_found_by_name_and_built_once() {
        let builds = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = builds.clone();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let registry = Registry::new(FakeHypervisor::named("qemu", &root)).with_factory(
            "builtin",
            move || {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok(FakeHypervisor::named("builtin", &root) as Arc<dyn Hypervisor>)
            },
        );
        assert_eq!(registry.default_backend().name(), "qemu");
        assert_eq!(registry.get("qemu").unwrap().name(), "qemu");
        assert_eq!(registry.get("builtin").unwrap().name(), "builtin");
        assert_eq!(registry.get("builtin").unwrap().name(), "builtin");
        assert_eq!(builds.load(std::sync::atomic::Ordering::SeqCst), 1);
        let err = registry.get("firecracker").err().unwrap();
        assert!(err.to_string().contains("firecracker"), "{err}");
    }
}
