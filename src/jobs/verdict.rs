//! What a pod's answer about a job says: still running, done, or gone.

use crate::config::DoneWhen;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Still running; a `Retry-After` in seconds says when to ask again.
    Running {
        retry_after: Option<Duration>,
    },
    Done,
    /// `404`/`410`: the pod does not know the job (any more).
    Unknown,
}

/// Status answers that need the body (`done_when: {json: …}`) are judged on it; others on the
/// status code alone. A `5xx` is a pod's trouble answering, not the job's end: running.
pub fn verdict(
    done_when: &DoneWhen,
    status: u16,
    retry_after: Option<&str>,
    body: Option<&[u8]>,
) -> Verdict {
    let running = Verdict::Running {
        retry_after: retry_after
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs),
    };
    if status == 404 || status == 410 {
        return Verdict::Unknown;
    }
    // An interim answer says nothing yet; a 5xx is the pod's trouble answering and another 4xx
    // the asker's (credentials, a bad query): neither is the job's end.
    if !(200..400).contains(&status) {
        return running;
    }
    match done_when {
        DoneWhen::Redirect => match status {
            301 | 302 | 303 | 307 | 308 => Verdict::Done,
            _ => running,
        },
        DoneWhen::NotAccepted => {
            if status == 202 {
                running
            } else {
                Verdict::Done
            }
        }
        DoneWhen::Json { pointer, done } => {
            let state = body
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
                .and_then(|v| v.pointer(pointer).cloned());
            match state {
                Some(serde_json::Value::String(s)) if done.iter().any(|d| d == &s) => Verdict::Done,
                _ => running,
            }
        }
    }
}

/// Whether judging an answer needs its body.
pub fn needs_body(done_when: &DoneWhen) -> bool {
    matches!(done_when, DoneWhen::Json { .. })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_convention_reads_its_own_answers() {
        let r = DoneWhen::Redirect;
        assert_eq!(verdict(&r, 303, None, None), Verdict::Done);
        assert_eq!(verdict(&r, 302, None, None), Verdict::Done);
        assert_eq!(
            verdict(&r, 202, Some("3"), None),
            Verdict::Running {
                retry_after: Some(Duration::from_secs(3))
            }
        );
        assert!(matches!(
            verdict(&r, 200, None, None),
            Verdict::Running { .. }
        ));
        let n = DoneWhen::NotAccepted;
        assert!(matches!(
            verdict(&n, 202, None, None),
            Verdict::Running { .. }
        ));
        assert_eq!(verdict(&n, 200, None, None), Verdict::Done);
        assert_eq!(verdict(&n, 303, None, None), Verdict::Done);
        for not_final in [100, 103, 400, 401, 403] {
            assert!(
                matches!(verdict(&n, not_final, None, None), Verdict::Running { .. }),
                "{not_final}"
            );
        }
        let j = DoneWhen::Json {
            pointer: "/task/status".into(),
            done: vec!["succeeded".into(), "failed".into()],
        };
        let body = |s: &str| format!(r#"{{"task": {{"status": "{s}"}}}}"#);
        assert_eq!(
            verdict(&j, 200, None, Some(body("failed").as_bytes())),
            Verdict::Done
        );
        assert!(matches!(
            verdict(&j, 200, None, Some(body("running").as_bytes())),
            Verdict::Running { .. }
        ));
        assert!(matches!(
            verdict(&j, 200, None, Some(b"not json")),
            Verdict::Running { .. }
        ));
        for c in [&r, &n, &j] {
            assert_eq!(verdict(c, 404, None, None), Verdict::Unknown);
            assert_eq!(verdict(c, 410, None, None), Verdict::Unknown);
            assert!(matches!(
                verdict(c, 503, None, None),
                Verdict::Running { .. }
            ));
        }
    }
}
