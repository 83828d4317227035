//! The std client library: connect, write, read back, map the export's
//! allocation, flush.
//!
//! ```text
//! cargo run --release -p nbd-std -- serve &
//! cargo run -p nbd-examples --example client -- nbd://127.0.0.1/
//! ```

use nbd_std::client::{Client, ZeroOptions};

#[tokio::main]
async fn main() -> Result<(), nbd_std::client::Error> {
    let uri = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "nbd://127.0.0.1/".to_owned());
    let client = Client::connect(&uri).await?;
    println!("{uri}: {} bytes", client.size());

    client.write_at(b"hello, block device", 4096).await?;
    let mut back = [0u8; 19];
    client.read_at(&mut back, 4096).await?;
    println!("read back: {}", String::from_utf8_lossy(&back));

    client
        .zero(1 << 20, 1 << 20, ZeroOptions::default())
        .await?;
    for extent in client.block_status(0, client.size().min(4 << 20)).await? {
        let kind = match (extent.is_hole(), extent.is_zero()) {
            (true, _) => "hole",
            (false, true) => "zeroes",
            (false, false) => "data",
        };
        println!("{:>10} +{:<10} {kind}", extent.offset, extent.length);
    }

    client.flush().await?;
    client.disconnect().await
}
