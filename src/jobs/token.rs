//! The job handle a client receives: where the job is (its pod, its status path, its route),
//! signed, so that it reaches the job from any replica and after a restart, and cannot be
//! forged or altered into a route to some other address.
//!
//! A handle is `base64url(payload) "." base64url(HMAC-SHA256(key, payload))`, the payload
//! `v1 <job id> <pod> <route uri> <path>` separated by newlines (none of them can hold one).
//! A job that its pod named in a JSON answer (`async.job_id`) gets a `v2` handle, which also
//! carries the pod's own id for the job: the client uses the handle *as* the id, in the
//! service's own paths (`/tasks/<handle>`), and lb-agent puts the pod's id back on the way.
//! The key comes from `LB_AGENT_JOB_KEY` (the same Secret on every replica); without it each
//! process draws its own, and its handles die with it (logged at start).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use std::net::SocketAddr;

/// Where a job lives, as its handle says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handle {
    /// Unguessable; names the job's hold (and its completion callback).
    pub job: u128,
    pub pod: SocketAddr,
    /// The route that accepted the job (its `uri`): says how to read the pod's answers.
    pub route: String,
    /// The path (and query) on the pod this handle stands for.
    pub path: String,
    /// The pod's own id for the job, when it named it in a JSON answer (a `v2` handle, which
    /// stands for that id in the client's paths); `None`: a `Location` handle.
    pub id: Option<String>,
}

/// How every `v2` handle begins: `base64url("v2\n")`. A path segment that does not begin so is
/// not looked at as a handle.
pub const V2_START: &str = "djIK";

/// Why a handle was refused: the client gets a `404` either way, the log says which.
#[derive(Debug, PartialEq, Eq)]
pub enum BadHandle {
    Malformed,
    Forged,
}

pub struct Keys {
    key: hmac::Key,
    random: SystemRandom,
    /// The key was given (`LB_AGENT_JOB_KEY`): handles outlive this process.
    pub shared: bool,
}

/// The shortest `LB_AGENT_JOB_KEY` taken: 128 bits of a random string's worth.
pub const MIN_KEY_BYTES: usize = 16;

impl Keys {
    /// From `LB_AGENT_JOB_KEY` when set (at least [`MIN_KEY_BYTES`]), otherwise a random key.
    pub fn from_env() -> Result<Keys, String> {
        match std::env::var("LB_AGENT_JOB_KEY") {
            Ok(k) if k.len() >= MIN_KEY_BYTES => Ok(Keys::with_key(k.as_bytes(), true)),
            Ok(_) => Err(format!(
                "LB_AGENT_JOB_KEY: too short (at least {MIN_KEY_BYTES} bytes; e.g. `openssl rand -hex 32`)"
            )),
            Err(_) => {
                let mut k = [0u8; 32];
                SystemRandom::new()
                    .fill(&mut k)
                    .map_err(|_| "no system randomness for the job key".to_string())?;
                Ok(Keys::with_key(&k, false))
            }
        }
    }

    pub fn with_key(key: &[u8], shared: bool) -> Keys {
        Keys {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
            random: SystemRandom::new(),
            shared,
        }
    }

    /// A new job id: 128 random bits.
    pub fn new_job(&self) -> u128 {
        let mut b = [0u8; 16];
        // SystemRandom fails only without a kernel random source, which `from_env` checked.
        let _ = self.random.fill(&mut b);
        u128::from_le_bytes(b)
    }

    pub fn mint(&self, h: &Handle) -> String {
        let payload = match &h.id {
            None => format!("v1\n{:032x}\n{}\n{}\n{}", h.job, h.pod, h.route, h.path),
            Some(id) => format!(
                "v2\n{:032x}\n{}\n{}\n{id}\n{}",
                h.job, h.pod, h.route, h.path
            ),
        };
        let tag = hmac::sign(&self.key, payload.as_bytes());
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(payload),
            URL_SAFE_NO_PAD.encode(tag.as_ref())
        )
    }

    pub fn verify(&self, token: &str) -> Result<Handle, BadHandle> {
        let (payload, tag) = token.split_once('.').ok_or(BadHandle::Malformed)?;
        let payload = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| BadHandle::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| BadHandle::Malformed)?;
        hmac::verify(&self.key, &payload, &tag).map_err(|_| BadHandle::Forged)?;
        // Signed by us: what follows cannot fail on a handle we minted.
        let payload = String::from_utf8(payload).map_err(|_| BadHandle::Malformed)?;
        let mut parts = payload.splitn(6, '\n');
        let v2 = match parts.next() {
            Some("v1") => false,
            Some("v2") => true,
            _ => return Err(BadHandle::Malformed),
        };
        let job = parts
            .next()
            .and_then(|j| u128::from_str_radix(j, 16).ok())
            .ok_or(BadHandle::Malformed)?;
        let pod = parts
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or(BadHandle::Malformed)?;
        let route = parts.next().ok_or(BadHandle::Malformed)?.to_string();
        let id = if v2 {
            Some(parts.next().ok_or(BadHandle::Malformed)?.to_string())
        } else {
            None
        };
        // A v1 path may hold newlines' worth of nothing else: it is the rest.
        let path = parts.collect::<Vec<_>>().join("\n");
        if path.is_empty() {
            return Err(BadHandle::Malformed);
        }
        Ok(Handle {
            job,
            pod,
            route,
            path,
            id,
        })
    }

    /// The completion callback's token: the job id alone, signed (a different form from a
    /// handle, so neither can stand for the other).
    pub fn mint_callback(&self, job: u128) -> String {
        let payload = format!("cb1\n{job:032x}");
        let tag = hmac::sign(&self.key, payload.as_bytes());
        format!("{job:032x}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    pub fn verify_callback(&self, token: &str) -> Result<u128, BadHandle> {
        let (job, tag) = token.split_once('.').ok_or(BadHandle::Malformed)?;
        let id = u128::from_str_radix(job, 16).map_err(|_| BadHandle::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| BadHandle::Malformed)?;
        let payload = format!("cb1\n{id:032x}");
        hmac::verify(&self.key, payload.as_bytes(), &tag).map_err(|_| BadHandle::Forged)?;
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle() -> Handle {
        Handle {
            job: 0x1234_5678_9abc_def0_1122_3344_5566_7788,
            pod: "10.1.2.3:20109".parse().unwrap(),
            route: "/VideoCodecService/Submit".into(),
            path: "/tasks/42?verbose=1".into(),
            id: None,
        }
    }

    /// A `v2` handle carries the pod's id and begins with [`V2_START`]; both forms verify.
    #[test]
    fn a_json_id_handle_carries_the_pods_id() {
        let keys = Keys::with_key(b"0123456789abcdef0123", true);
        let mut h = handle();
        h.id = Some("a1b2-c3".into());
        h.path = "/tasks/a1b2-c3".into();
        let token = keys.mint(&h);
        assert!(token.starts_with(V2_START), "{token}");
        assert_eq!(keys.verify(&token), Ok(h));
        assert!(!keys.mint(&handle()).starts_with(V2_START));
    }

    #[test]
    fn a_minted_handle_verifies_to_what_it_was_minted_from() {
        let keys = Keys::with_key(b"0123456789abcdef0123", true);
        let token = keys.mint(&handle());
        assert!(token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.'));
        assert_eq!(keys.verify(&token), Ok(handle()));
        // Another replica with the same key reads it too.
        let other = Keys::with_key(b"0123456789abcdef0123", true);
        assert_eq!(other.verify(&token), Ok(handle()));
    }

    #[test]
    fn an_altered_or_foreign_handle_is_refused() {
        let keys = Keys::with_key(b"0123456789abcdef0123", true);
        let token = keys.mint(&handle());
        let (payload, tag) = token.split_once('.').unwrap();
        // The same claims pointing at another address, with the original tag.
        let mut forged = handle();
        forged.pod = "169.254.169.254:80".parse().unwrap();
        let forged_payload = keys.mint(&forged);
        let forged_payload = forged_payload.split_once('.').unwrap().0;
        assert_eq!(
            keys.verify(&format!("{forged_payload}.{tag}")),
            Err(BadHandle::Forged)
        );
        assert_eq!(
            Keys::with_key(b"another key, 16+ bytes", true).verify(&token),
            Err(BadHandle::Forged)
        );
        assert_eq!(keys.verify(payload), Err(BadHandle::Malformed));
        assert_eq!(keys.verify("not a token"), Err(BadHandle::Malformed));
        // A callback token is not a handle, nor the other way round.
        let cb = keys.mint_callback(handle().job);
        assert!(keys.verify(&cb).is_err());
        assert!(keys.verify_callback(&token).is_err());
        assert_eq!(keys.verify_callback(&cb), Ok(handle().job));
        let (id, tag) = cb.split_once('.').unwrap();
        let other_id = format!("{:032x}", u128::from_str_radix(id, 16).unwrap() + 1);
        assert_eq!(
            keys.verify_callback(&format!("{other_id}.{tag}")),
            Err(BadHandle::Forged)
        );
    }
}
