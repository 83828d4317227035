//! Logging macros that forward to `defmt` or `log` when one of those
//! features is enabled and compile to nothing otherwise.
//!
//! Arguments use `defmt`'s subset of format syntax (`{}`, `{=u64}` is not
//! used), so a message reads the same on a microcontroller and in a server
//! log. Arguments are still type-checked when logging is off.

#[cfg(feature = "defmt")]
macro_rules! nbd_log {
    (debug, $($arg:tt)+) => { defmt::debug!($($arg)+) };
    (info, $($arg:tt)+) => { defmt::info!($($arg)+) };
    (warn, $($arg:tt)+) => { defmt::warn!($($arg)+) };
}

#[cfg(feature = "log")]
macro_rules! nbd_log {
    (debug, $($arg:tt)+) => { ::log::debug!(target: "nbd_core", $($arg)+) };
    (info, $($arg:tt)+) => { ::log::info!(target: "nbd_core", $($arg)+) };
    (warn, $($arg:tt)+) => { ::log::warn!(target: "nbd_core", $($arg)+) };
}

#[cfg(not(any(feature = "defmt", feature = "log")))]
macro_rules! nbd_log {
    ($level:ident, $($arg:tt)+) => {
        if false {
            let _ = core::format_args!($($arg)+);
        }
    };
}

macro_rules! debug {
    ($($arg:tt)+) => { nbd_log!(debug, $($arg)+) };
}

macro_rules! info {
    ($($arg:tt)+) => { nbd_log!(info, $($arg)+) };
}

macro_rules! warn {
    ($($arg:tt)+) => { nbd_log!(warn, $($arg)+) };
}
