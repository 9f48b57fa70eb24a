//! vfplug's node adapter: sysfs inventory, uevents, netlink, driver binding
