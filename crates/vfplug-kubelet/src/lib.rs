//! Kubelet device-plugin v1beta1 server, plugin registration and PodResources client
