//! NVMe IOPS partitioner (issue 4).

#[cfg(feature = "std")]
pub mod sim;
