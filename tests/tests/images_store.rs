//! End-to-end, through the daemon's CRI socket: the pull progress in the daemon's log file,
//! and ImageFsInfo against what RemoveImage frees (what kubelet's image GC relies on).

use std::time::Duration;

use k8s_cri::v1 as cri;
use podvisor_e2e::daemon::{e2e_can_run, TestDaemon};
use podvisor_e2e::registry::TestRegistry;
use podvisor_e2e::slow_registry::{LayerDelivery, SlowRegistry};

/// A pull longer than the 5 s progress interval logs `pulling image` lines with bytes done
/// and total into the daemon's log, a file: no terminal escape codes in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_pull_logs_progress_to_the_daemon_log_file_without_escape_codes() {
    if !e2e_can_run() {
        return;
    }
    // 8 pieces 0.9 s apart: about 7 s, never silent near the 60 s progress timeout.
    let registry = SlowRegistry::start(LayerDelivery::Trickle {
        pieces: 8,
        pause: Duration::from_millis(900),
    })
    .unwrap();
    let daemon = TestDaemon::start("").await.unwrap();
    daemon.pull(&registry.reference()).await;
    let log = std::fs::read_to_string(daemon.log_file()).unwrap();
    let progress: Vec<&str> = log.lines().filter(|l| l.contains("pulling image")).collect();
    assert!(!progress.is_empty(), "no progress line in:\n{log}");
    assert!(progress.iter().all(|l| l.contains("done=") && l.contains("total=")), "{log}");
    assert!(log.lines().any(|l| l.contains("image pulled") && l.contains("bytes_per_second=")));
    assert!(!log.contains('\u{1b}'), "escape codes in the log file:\n{log}");
}

async fn used_bytes(
    images: &mut cri::image_service_client::ImageServiceClient<tonic::transport::Channel>,
) -> u64 {
    let info = images.image_fs_info(cri::ImageFsInfoRequest::default()).await.unwrap().into_inner();
    info.image_filesystems[0].used_bytes.as_ref().map_or(0, |b| b.value)
}

/// ImageFsInfo falls by exactly the size ListImages reports for an image once RemoveImage
/// removed it, as kubelet's image GC expects when it picks images to free space.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_fs_info_falls_by_what_remove_image_frees() {
    if !e2e_can_run() {
        return;
    }
    let registry = TestRegistry::start().unwrap();
    let busybox = registry.push_busybox("busybox:1").unwrap();
    let multi = registry.push_multilayer("multi:1").unwrap();
    let daemon = TestDaemon::start("").await.unwrap();
    daemon.pull(&busybox).await;
    daemon.pull(&multi).await;
    let mut images = daemon.images().await.unwrap();
    let listed = images.list_images(cri::ListImagesRequest::default()).await.unwrap().into_inner();
    assert_eq!(listed.images.len(), 2);
    // The two share no blob: each frees exactly its own size.
    for image in listed.images {
        let before = used_bytes(&mut images).await;
        images
            .remove_image(cri::RemoveImageRequest {
                image: Some(cri::ImageSpec { image: image.id.clone(), ..Default::default() }),
            })
            .await
            .unwrap();
        let after = used_bytes(&mut images).await;
        assert_eq!(before - after, image.size, "{:?}", image.repo_tags);
    }
}
