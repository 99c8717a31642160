//! Glue between the image store (crate `podvisor-image`) and the daemon: the CRI
//! ImageService, and the sandbox manager's [`ImageResolver`].

pub mod control;
pub mod progress;

use std::sync::Arc;

use anyhow::Context;
use podvisor_image::{ImageStore, ImageStoreConfig};

use crate::config::Config;
use crate::cri::image::{ImageServiceImpl, ImageUsers};
use crate::sandbox::spec::ImageDefaults;
use crate::sandbox::{ImageResolver, ResolvedImage};

/// The daemon's image store.
pub struct Images {
    store: Arc<ImageStore>,
}

/// The store's settings from `[images]`: the daemon's, and `podvisor images`' when it works
/// on the store itself (the same limits hold for an import either way).
pub fn store_config(config: &Config) -> anyhow::Result<ImageStoreConfig> {
    Ok(ImageStoreConfig {
        insecure_registries: config.images.insecure_registries.clone(),
        docker_config: config.images.docker_config.clone(),
        pull_progress_timeout: config.images.pull_progress_timeout(),
        pinned: config.images.pinned.clone(),
        max_image_bytes: u64::from(config.images.max_image_gib) << 30,
        max_unpacked_bytes: u64::from(config.images.max_unpacked_gib) << 30,
        registries: config.images.registries()?,
        ..ImageStoreConfig::default()
    })
}

pub fn open_store(config: &Config) -> anyhow::Result<Images> {
    let store = ImageStore::open(&config.root, store_config(config)?)
        .with_context(|| format!("opening the image store under {}", config.root.display()))?;
    Ok(Images { store: Arc::new(store) })
}

impl Images {
    pub fn resolver(&self) -> Arc<dyn ImageResolver> {
        Arc::new(StoreResolver { store: self.store.clone() })
    }

    /// Reads the bytes downloaded from registries so far (for the metrics).
    pub fn bytes_downloaded(&self) -> impl Fn() -> u64 + Send + Sync + 'static {
        let store = self.store.clone();
        move || store.bytes_downloaded()
    }

    /// Serves `podvisor images import|export` on `<state>/images.sock`.
    pub fn serve_control(&self, config: &Config) -> anyhow::Result<()> {
        control::serve(&config.state, self.store.clone())?;
        Ok(())
    }

    /// The CRI ImageService; `users` keeps images that containers use from being removed.
    pub fn cri_service(&self, users: Arc<dyn ImageUsers>) -> ImageServiceImpl {
        ImageServiceImpl::new(self.store.clone(), Some(users))
    }
}

struct StoreResolver {
    store: Arc<ImageStore>,
}

impl ImageResolver for StoreResolver {
    fn resolve(&self, image: &str) -> Result<Option<ResolvedImage>, String> {
        let Some(record) = self.store.resolve(image) else { return Ok(None) };
        let config = self.store.image_config(&record.id).map_err(|e| e.to_string())?;
        let rootfs = self.store.rootfs_dir(&record.id).map_err(|e| e.to_string())?;
        let image_ref = record.repo_digests.first().cloned().unwrap_or_else(|| record.id.clone());
        Ok(Some(ResolvedImage {
            id: record.id,
            image_ref,
            defaults: ImageDefaults {
                entrypoint: config.entrypoint,
                cmd: config.cmd,
                env: config.env,
                working_dir: config.working_dir.unwrap_or_default(),
                user: config.user.unwrap_or_default(),
                rootfs: rootfs.clone(),
                stop_signal: config.stop_signal,
            },
            rootfs,
        }))
    }
}
