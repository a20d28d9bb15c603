//! virtio (in progress)
