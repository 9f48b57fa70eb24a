//! Async QMP client for QEMU: negotiation, typed commands and events, waiter-before-send
