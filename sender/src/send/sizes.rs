//! What a reply in flight holds. The dispatcher keeps each send's future on the heap for as
//! long as the send lasts, so under a slow Twilio every reply in flight costs its size; a
//! wrapper that takes the send by value (an async fn keeps its arguments apart from its
//! locals, and pinning moves them once more) holds copies of it.

use bus::Delivery;
use wagate_core::envelope::OutboundReply;

use super::SendContext;

/// The size of the future `f` returns.
fn future_size<'a, F>(
    _: impl FnOnce(&'a SendContext, Box<dyn Delivery>, OutboundReply) -> F,
) -> usize {
    std::mem::size_of::<F>()
}

#[test]
fn a_send_in_flight_holds_its_steps_once() {
    let size = future_size(SendContext::send_one);
    eprintln!("send_one: {size} bytes");
    assert!(size < 5 * 1024, "send_one's future: {size} bytes");
}
