//! Call deadlines: the client's `grpc-timeout`, worked out once when the request head
//! arrives, and a future raced against it.

use std::future::Future;
use std::time::{Duration, Instant};

use tonic::Request;

/// A call's deadline, worked out once by the layer in front of every service
/// (the server's front layer) when the request head arrives, before the body is read.
#[derive(Clone, Copy, Debug)]
pub struct CallDeadline(pub Option<Instant>);

/// How much earlier than the client's `grpc-timeout` our own deadline fires. tonic's server
/// runs its own timer from the same header and, when it wins, drops the handler and answers
/// CANCELLED "Timeout expired"; firing first lets us stop the job and answer
/// DEADLINE_EXCEEDED naming the stage the call was in.
const DEADLINE_MARGIN: Duration = Duration::from_millis(2);

/// Parses a `grpc-timeout` value (`<1-8 digits><H|M|S|m|u|n>`).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    if num.is_empty() || num.len() > 8 || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The deadline for a call whose head arrived at `arrived` with these headers: the client's
/// `grpc-timeout` less [`DEADLINE_MARGIN`]; none without a (valid, representable) timeout.
pub fn deadline_from(headers: &http::HeaderMap, arrived: Instant) -> Option<Instant> {
    let d = parse_grpc_timeout(headers.get("grpc-timeout")?.to_str().ok()?)?;
    let at = arrived.checked_add(d)?;
    Some(
        at.checked_sub(DEADLINE_MARGIN)
            .unwrap_or(arrived)
            .max(arrived),
    )
}

/// The call's deadline as set by the front layer; a request that did not pass through it
/// (a handler called directly) is timed from now.
pub fn of_request<T>(request: &Request<T>) -> Option<Instant> {
    match request.extensions().get::<CallDeadline>() {
        Some(d) => d.0,
        None => deadline_from(request.metadata().as_ref(), Instant::now()),
    }
}

/// Runs `fut` until `at`; `Err(())` once `at` has passed.
///
/// Besides its own timer, every poll compares the clock with `at`: tokio's timer wheel is
/// sharded per worker, so tonic's later timer (see [`DEADLINE_MARGIN`]) can wake the call
/// before ours has been fired; the clock check makes the earlier deadline win regardless.
pub async fn before<F: Future>(at: Instant, fut: F) -> Result<F::Output, ()> {
    let mut fut = std::pin::pin!(fut);
    let mut timer = std::pin::pin!(tokio::time::sleep_until(at.into()));
    std::future::poll_fn(|cx| {
        if let std::task::Poll::Ready(v) = fut.as_mut().poll(cx) {
            return std::task::Poll::Ready(Ok(v));
        }
        if Instant::now() >= at || timer.as_mut().poll(cx).is_ready() {
            return std::task::Poll::Ready(Err(()));
        }
        std::task::Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units_and_malformed_values() {
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("50m"), Some(Duration::from_millis(50)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in [
            "",
            "m",
            "5",
            "5x",
            "-5m",
            "+5m",
            "123456789m",
            "5 m",
            "1.5S",
        ] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn deadline_fires_a_margin_before_the_clients_and_never_before_arrival() {
        let t0 = Instant::now();
        let mut h = http::HeaderMap::new();
        assert_eq!(deadline_from(&h, t0), None);
        h.insert("grpc-timeout", "100m".parse().unwrap());
        assert_eq!(
            deadline_from(&h, t0),
            Some(t0 + Duration::from_millis(100) - DEADLINE_MARGIN)
        );
        h.insert("grpc-timeout", "1m".parse().unwrap());
        assert_eq!(deadline_from(&h, t0), Some(t0));
        h.insert("grpc-timeout", "soon".parse().unwrap());
        assert_eq!(deadline_from(&h, t0), None);
    }
}
