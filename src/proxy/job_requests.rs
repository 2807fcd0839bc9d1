//! The proxy's side of asynchronous jobs ([`crate::jobs`]): a job handle's requests, the pod's
//! completion callback, and what the pod's answers say about a job.

use pingora::proxy::Session;
use std::sync::Arc;

use super::{Ctx, JobPoll, LbProxy, Refusal};
use crate::jobs::{self, Ended, Handle, Verdict};
use crate::respond::write_text;

/// The largest job status answer read to judge a JSON state (larger: the check judges it).
pub(super) const JOB_STATUS_BODY_LIMIT: usize = 64 * 1024;

/// The longest a `202` waits for its job's hold to be marked in the shared ledger.
const JOB_MARK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The largest submission answer read for the job id it names in JSON (`async.job_id`); a
/// longer one names none and is passed on as it is.
pub(super) const JOB_ANSWER_LIMIT: usize = 64 * 1024;

/// Whether a request with `method` can submit a job a pod names in JSON: asking (`GET`,
/// `HEAD`, `OPTIONS`) or deleting does not, whatever its answer holds.
pub(super) fn submits(method: &http::Method) -> bool {
    matches!(
        *method,
        http::Method::POST | http::Method::PUT | http::Method::PATCH
    )
}

/// Where a job's handle stands in a client's request.
pub(super) enum JobPlace {
    /// `/_lb/jobs/<handle><suffix>`: the handle stands for its path on the pod.
    Suffix(String),
    /// `<before><handle><after>`: a JSON job's handle stands for the pod's id for the job.
    InPlaceOfId { before: String, after: String },
}

impl LbProxy {
    /// `GET`/`HEAD`/`DELETE` on `/_lb/jobs/<token>[/<more>]`, or on a path where a JSON job's
    /// token stands for its id: to the job's pod, untouched otherwise. A handle that does not
    /// verify is refused with `404` and goes nowhere.
    pub(super) async fn job_request(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        token: &str,
        place: JobPlace,
    ) -> pingora::Result<bool> {
        let verified = self.live.jobs.keys.verify(token).and_then(|h| match place {
            JobPlace::InPlaceOfId { .. } if h.id.is_none() => Err(jobs::BadHandle::Malformed),
            _ => Ok(h),
        });
        let handle = match verified {
            Ok(h) => h,
            Err(why) => {
                log::info!("refused a job handle ({why:?})");
                ctx.refusal = Some(Refusal::JobRefused);
                write_text(session, 404, "lb-agent: no such job\n".into(), false).await?;
                return Ok(true);
            }
        };
        let method = &session.req_header().method;
        if !matches!(
            *method,
            http::Method::GET | http::Method::HEAD | http::Method::DELETE
        ) {
            ctx.refusal = Some(Refusal::JobRefused);
            write_text(
                session,
                405,
                "lb-agent: a job is asked about with GET or HEAD, and cancelled with DELETE\n"
                    .into(),
                false,
            )
            .await?;
            return Ok(true);
        }
        let route = self
            .live
            .snapshot()
            .routes
            .lookup(&handle.route)
            .filter(|r| r.async_jobs.is_some())
            .map(Arc::clone);
        let Some(route) = route else {
            ctx.refusal = Some(Refusal::JobRefused);
            let msg = format!(
                "lb-agent: no asynchronous route {} any more for this job\n",
                handle.route
            );
            write_text(session, 404, msg, false).await?;
            return Ok(true);
        };
        // The hold itself ends by its own check, against the pool that accepted the job (a
        // reload may have moved the route since).
        if route.balancer.resolved() && !route.balancer.trusted_pods().contains(&handle.pod) {
            ctx.refusal = Some(Refusal::JobRefused);
            let msg = format!(
                "lb-agent: the job's pod {} is gone (no longer in {})\n",
                handle.pod,
                route.balancer.name()
            );
            write_text(session, 410, msg, false).await?;
            return Ok(true);
        }
        let (own_path, own_query) = match handle.path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (handle.path.as_str(), None),
        };
        let query = session.req_header().uri.query();
        let same_query = query.is_none_or(|q| Some(q) == own_query);
        // The job's own path (whatever the query): where a DELETE cancels the job.
        let (target, is_job_path) = match &place {
            JobPlace::Suffix(suffix) => (jobs::pod_uri(&handle, suffix, query), suffix.is_empty()),
            JobPlace::InPlaceOfId { before, after } => {
                let id = handle.id.as_deref().unwrap_or_default();
                let path = format!("{before}{id}{after}");
                let own = path == own_path;
                // As for a `/_lb/jobs/` handle: the status path is asked with its own query
                // unless the client gives one.
                match query.or(own_query.filter(|_| own)) {
                    Some(q) => (format!("{path}?{q}"), own),
                    None => (path, own),
                }
            }
        };
        ctx.route = Some(route);
        ctx.job_poll = Some(JobPoll {
            target,
            handle,
            is_status: is_job_path && same_query,
            is_job_path,
        });
        Ok(false)
    }

    /// The pod's `POST` to the callback URL it was given with the job: the job's slot is freed
    /// at once. Only that URL's token names that job.
    pub(super) async fn job_callback(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        token: &str,
    ) -> pingora::Result<bool> {
        ctx.refusal = Some(Refusal::JobRefused);
        let Ok(job) = self.live.jobs.keys.verify_callback(token) else {
            write_text(session, 404, "lb-agent: no such job\n".into(), false).await?;
            return Ok(true);
        };
        if !matches!(
            session.req_header().method,
            http::Method::POST | http::Method::PUT
        ) {
            write_text(
                session,
                405,
                "lb-agent: report a job done with POST\n".into(),
                false,
            )
            .await?;
            return Ok(true);
        }
        ctx.refusal = Some(Refusal::JobCallback);
        self.live.jobs.callback(job);
        write_text(session, 204, String::new(), false).await?;
        Ok(true)
    }

    /// Reads the pod's answer for what it says about a job: a `202` with a `Location` on an
    /// `async` route starts one (the slot moves to it, the client gets a handle); an answer to
    /// a handle's request may end one. Every `Location` naming the pod becomes a handle.
    pub(super) async fn follow_job(
        &self,
        session: &Session,
        response: &mut pingora::http::ResponseHeader,
        ctx: &mut Ctx,
    ) {
        let status = response.status.as_u16();
        let location = response
            .headers
            .get(http::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if let Some(poll) = &ctx.job_poll {
            let (job, pod, route) = (poll.handle.job, poll.handle.pod, poll.handle.route.clone());
            let method = session.req_header().method.clone();
            let cancel = method == http::Method::DELETE && poll.is_job_path;
            if cancel && matches!(status, 200 | 202 | 204) {
                self.live.jobs.release(job, Ended::Cancelled);
            } else if cancel && matches!(status, 404 | 410) {
                self.live.jobs.release(job, Ended::Unknown);
            } else if method == http::Method::GET || method == http::Method::HEAD {
                let needs_body = ctx
                    .route
                    .as_ref()
                    .and_then(|r| r.async_jobs.as_ref())
                    .is_some_and(|a| jobs::needs_body(&a.done_when));
                if needs_body && method == http::Method::GET && status < 300 {
                    ctx.job_body = Some(Vec::new());
                } else {
                    self.judge_job_answer(ctx, status, None);
                }
            }
            // A relative Location is relative to the path asked of the pod, not the handle's.
            let asked = poll.target.split('?').next().unwrap_or("/");
            let moved = location.and_then(|l| jobs::pod_path(&l, pod, asked));
            if let Some(path) = moved {
                let handle = Handle {
                    job,
                    pod,
                    route,
                    path,
                    id: None,
                };
                let _ = response
                    .insert_header(http::header::LOCATION, self.live.jobs.location(&handle));
            }
            return;
        }
        let Some(route) = ctx.route.clone() else {
            return;
        };
        let Some(cfg) = route.async_jobs.as_ref() else {
            return;
        };
        if ctx.slot.is_none() {
            return;
        }
        if cfg.job_id.is_some() {
            // The job, if any, is named in the answer's body: read it whole first (see
            // `take_json_job`). Its length changes when the id is replaced by the handle.
            let length = super::content_length(response);
            if matches!(status, 200..=202)
                && length.is_none_or(|len| (1..=JOB_ANSWER_LIMIT).contains(&len))
                && submits(&session.req_header().method)
            {
                ctx.job_answer = Some(Vec::new());
            }
            return;
        }
        let (Some(location), 202) = (location, status) else {
            return;
        };
        let job = ctx
            .job_id
            .take()
            .unwrap_or_else(|| self.live.jobs.keys.new_job());
        let asked = session.req_header().uri.path();
        // Not a job lb-agent can follow (None): the slot stays the request's.
        if let Some((handle, marking)) =
            self.live
                .jobs
                .accept(&route, cfg, &mut ctx.slot, job, &location, asked)
        {
            let _ =
                response.insert_header(http::header::LOCATION, self.live.jobs.location(&handle));
            if let Some(marking) = marking {
                // The hold is in the shared ledger before the client hears of the job. A ledger
                // that does not answer soon does not hold the answer back (the hold stays this
                // agent's, as without the mark).
                let _ = tokio::time::timeout(JOB_MARK_WAIT, marking).await;
            }
        }
    }

    /// The whole of a submission's answer on a route whose pods name their jobs in JSON: if it
    /// names one, the job takes the request's slot and the id in the answer is replaced by the
    /// job's handle (which the client then uses as the id, in the service's own paths). What
    /// is returned is passed on to the client.
    ///
    /// Unlike a `Location` job's `202`, the answer does not wait for the hold to be marked in
    /// a shared ledger (a body filter cannot wait): an agent killed within that round trip
    /// leaves the job's slot to be reaped as a request's.
    pub(super) fn take_json_job(&self, ctx: &mut Ctx, answer: Vec<u8>) -> bytes::Bytes {
        let (Some(route), Some(pod)) = (ctx.route.clone(), ctx.slot.as_ref().map(|s| s.addr()))
        else {
            return answer.into();
        };
        let Some((cfg, spec)) = route
            .async_jobs
            .as_ref()
            .and_then(|c| Some((c, c.job_id.as_ref()?)))
        else {
            return answer.into();
        };
        let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(&answer) else {
            log::debug!("pod {pod}: a submission's answer is not JSON: no job");
            return answer.into();
        };
        let Some(id) = jobs::json_job_id(&value, &spec.pointer) else {
            log::debug!(
                "pod {pod}: no job id at {} in its answer: no job",
                spec.pointer
            );
            return answer.into();
        };
        let job = ctx
            .job_id
            .take()
            .unwrap_or_else(|| self.live.jobs.keys.new_job());
        let Some((handle, _marking)) =
            self.live
                .jobs
                .accept_json(&route, cfg, spec, &mut ctx.slot, job, &id)
        else {
            return answer.into();
        };
        if let Some(at) = value.pointer_mut(&spec.pointer) {
            *at = serde_json::Value::String(self.live.jobs.token(&handle));
        }
        match serde_json::to_vec(&value) {
            Ok(v) => v.into(),
            Err(_) => answer.into(),
        }
    }

    /// What an answer about a polled job says; a final one ends the job's hold.
    pub(super) fn judge_job_answer(&self, ctx: &Ctx, status: u16, body: Option<&[u8]>) {
        let (Some(poll), Some(cfg)) = (
            &ctx.job_poll,
            ctx.route.as_ref().and_then(|r| r.async_jobs.as_ref()),
        ) else {
            return;
        };
        if !poll.is_status {
            return;
        }
        match jobs::verdict(&cfg.done_when, status, None, body) {
            Verdict::Done => {
                self.live.jobs.release(poll.handle.job, Ended::Done);
            }
            Verdict::Unknown => {
                self.live.jobs.release(poll.handle.job, Ended::Unknown);
            }
            Verdict::Running { .. } => {}
        }
    }
}
