//! `nbd-std`: command-line front end of the std shell.
//!
//! No commands exist yet; `serve` arrives with the server.

use std::process::ExitCode;

fn usage() -> String {
    format!(
        "usage: nbd-std <command> [args...]\n\
         \n\
         No commands are implemented yet (the `serve` command is coming).\n\
         The default NBD port is {}.\n",
        nbd_std::DEFAULT_PORT
    )
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("-h" | "--help" | "help") => {
            print!("{}", usage());
            ExitCode::SUCCESS
        }
        Some(other) => {
            eprintln!("nbd-std: unknown command `{other}`\n");
            eprint!("{}", usage());
            ExitCode::from(2)
        }
        None => {
            eprint!("{}", usage());
            ExitCode::from(2)
        }
    }
}
