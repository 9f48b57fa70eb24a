//! Fuzz `Invocation::parse` with an arbitrary environment and stdin. Input: `KEY=VALUE` lines
//! (the environment; keys without the `CNI_` prefix get it), a NUL byte, then stdin. It must
//! return Ok or a CNI error with a code the shim may print, never panic; whatever it accepts
//! for ADD must have valid VF settings and map to a node API request.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use vfplug_cni::error::KNOWN_CODES;
use vfplug_cni::{Command, Invocation, mapping};

fuzz_target!(|data: &[u8]| {
    let (env_part, stdin) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let mut vars = HashMap::new();
    for line in String::from_utf8_lossy(env_part).lines() {
        if let Some((k, v)) = line.split_once('=') {
            let k = if k.starts_with("CNI_") { k.to_owned() } else { format!("CNI_{k}") };
            vars.insert(k, v.to_owned());
        }
    }
    match Invocation::parse(&vars, stdin) {
        Ok(inv) => {
            if matches!(inv.env.command, Command::Add | Command::Check) {
                assert!(inv.vf.validate().is_ok());
            }
            if inv.env.command == Command::Add {
                assert!(mapping::add_request(&inv, None).is_ok());
            }
        }
        Err(e) => {
            assert!(KNOWN_CODES.contains(&e.code), "code {} ({})", e.code, e.msg);
            assert!(!e.msg.is_empty());
        }
    }
});
