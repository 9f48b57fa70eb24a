//! Event sources that tell the daemon when to rescan (in progress).
