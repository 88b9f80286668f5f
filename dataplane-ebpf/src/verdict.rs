//! What the datapath decided about a packet that is not simply passed on after its rewrite.
//!
//! Every module returns a `Result<(), Verdict>`; only the entry points in `main.rs` turn it into
//! a hook's action (a TC action for the classifiers), so the verdict is decided in one place.
//! This module holds the vocabulary only: it must not act on a packet or count anything.

use dataplane_common::Reason;

/// Why a packet was not (or not fully) handled.
pub enum Verdict {
    /// Leave the packet as it is.
    Pass(Reason),
    /// Drop it.
    Drop(Reason),
    /// Hand it to the peer of this veth (a pod's interface), in the pod's namespace.
    RedirectPeer(u32),
    /// A new flow to a service without backends: answer it as a closed port would.
    Refuse,
}

impl Verdict {
    /// The verdict for a packet whose rewrite a helper refused: dropped, since a half-rewritten
    /// packet must not leave.
    #[inline(always)]
    pub fn rewrite_failed<E>(_: E) -> Verdict {
        Verdict::Drop(Reason::RewriteFailed)
    }
}
