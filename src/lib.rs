//! Krasis CPU core: expert kernels, quantisation, thread pool and expert store.
//! `python.rs` is the only module that knows PyO3.

pub mod bandwidth;
pub mod decode_link;
pub mod expert_copy;
pub mod ggml_quants;
pub mod gguf_store;
pub mod kernels;
pub mod matmul;
pub mod moe;
pub mod numa;
pub mod pool;
pub mod quant;
pub mod simd;
pub mod store;
pub mod topology;
pub mod warm;

#[cfg(test)]
pub(crate) mod testutil;

#[cfg(feature = "extension-module")]
mod python;
