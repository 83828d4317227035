//! The connection's memory footprint, a number the project tracks
//! (docs/CORE.md "Memory"). Run with `--nocapture` to see it.

use core::mem::size_of;

use nbd_core::export::Export;
use nbd_core::server::{SmallConnection, StdConnection};

#[test]
fn connection_sizes() {
    let small = size_of::<SmallConnection<&[Export<'static>]>>();
    let std = size_of::<StdConnection<&[Export<'static>]>>();
    println!("size_of SmallConnection (16 requests, 320-byte buffer): {small} bytes");
    println!("size_of StdConnection (128 requests, 16 KiB buffer): {std} bytes");
    assert!(
        small < 2048,
        "small connection grew to {small} bytes; the goal is under 2 KiB"
    );
}
