//! Logging through `defmt` with the `defmt` feature; nothing otherwise
//! (arguments are still type-checked).

#[cfg(feature = "defmt")]
macro_rules! nbd_log {
    (debug, $($arg:tt)+) => { defmt::debug!($($arg)+) };
    (info, $($arg:tt)+) => { defmt::info!($($arg)+) };
    (warn, $($arg:tt)+) => { defmt::warn!($($arg)+) };
}

#[cfg(not(feature = "defmt"))]
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
