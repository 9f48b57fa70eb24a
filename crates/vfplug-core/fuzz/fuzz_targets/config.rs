//! Fuzz `Config::parse` (both formats): it must return Ok or a `ConfigError`, never panic, and
//! whatever it accepts must pass `validate()`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vfplug_core::Config;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(cfg) = Config::parse(text)
    {
        assert!(cfg.validate().is_ok());
    }
});
