//! The seed workflow without a kernel client: an ext4 image made by
//! `mkfs.ext4` goes through the server with `nbdcopy` and comes back clean
//! for `e2fsck`.

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::{
    Server, assert_same_content, create_sparse_file, have_tools, run_ok, temp_dir, tool,
    write_random_file,
};

const TIMEOUT: Duration = Duration::from_secs(60);
const IMAGE_SIZE: &str = "64M";
const IMAGE_BYTES: u64 = 64 << 20;

/// An ext4 image of 64 MiB populated with a few files (`mkfs.ext4 -d`).
fn make_ext4_image(dir: &Path, image: &Path) {
    let content = dir.join("content");
    fs::create_dir_all(content.join("sub")).expect("create content directory");
    fs::write(content.join("hello.txt"), "hello from nbd-std\n").expect("write file");
    write_random_file(&content.join("sub/random.bin"), 3 << 20, 7);
    run_ok(
        tool("mkfs.ext4")
            .args([
                "-F",
                "-q",
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0",
                "-d",
            ])
            .arg(&content)
            .arg(image)
            .arg(IMAGE_SIZE),
        TIMEOUT,
    );
    e2fsck_clean(image);
}

/// `e2fsck -fn` finds nothing to fix, and the files read back.
fn e2fsck_clean(image: &Path) {
    run_ok(tool("e2fsck").arg("-fn").arg(image), TIMEOUT);
    let out = run_ok(
        tool("debugfs").args(["-R", "cat /hello.txt"]).arg(image),
        TIMEOUT,
    );
    assert!(
        out.stdout.contains("hello from nbd-std"),
        "file content in the image\n{}",
        out.describe()
    );
}

#[test]
fn ext4_image_through_a_memory_export() {
    if !have_tools(&["mkfs.ext4", "e2fsck", "debugfs", "nbdcopy"]) {
        return;
    }
    let dir = temp_dir();
    let image = dir.path().join("fs.img");
    let copy = dir.path().join("copy.img");
    make_ext4_image(dir.path(), &image);
    let server = Server::start(["--size", IMAGE_SIZE]);
    run_ok(tool("nbdcopy").arg(&image).arg(server.uri()), TIMEOUT);
    run_ok(tool("nbdcopy").arg(server.uri()).arg(&copy), TIMEOUT);
    e2fsck_clean(&copy);
    assert_same_content(&image, &copy);
}

#[test]
fn ext4_image_written_to_a_file_export() {
    if !have_tools(&["mkfs.ext4", "e2fsck", "debugfs", "nbdcopy"]) {
        return;
    }
    let dir = temp_dir();
    let image = dir.path().join("fs.img");
    let backing = dir.path().join("backing.img");
    make_ext4_image(dir.path(), &image);
    create_sparse_file(&backing, IMAGE_BYTES);
    let mut server = Server::start([
        "--export".to_owned(),
        format!("disk=file:{}", backing.display()),
    ]);
    run_ok(
        tool("nbdcopy").arg(&image).arg(server.uri_for("disk")),
        TIMEOUT,
    );
    // SIGTERM flushes the file export and exits 0.
    server.stop();
    e2fsck_clean(&backing);
    assert_same_content(&image, &backing);
}
