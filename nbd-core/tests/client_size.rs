//! The client connection's memory footprint, a number the project tracks
//! (docs/CORE.md "Memory"). Run with `--nocapture` to see it.

use core::mem::size_of;

use nbd_core::client::{Connection, SmallConnection, StdConnection};

#[test]
fn client_connection_sizes() {
    let small = size_of::<SmallConnection>();
    let std = size_of::<StdConnection>();
    let tiny = size_of::<Connection<4, 128>>();
    println!("size_of client SmallConnection (16 requests, 320-byte buffer): {small} bytes");
    println!("size_of client StdConnection (128 requests, 16 KiB buffer): {std} bytes");
    println!("size_of client Connection<4, 128>: {tiny} bytes");
    assert!(
        small < 2048,
        "small client connection grew to {small} bytes; the goal is under 2 KiB"
    );
}
