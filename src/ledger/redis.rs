//! The `redis` ledger: replicas share one Redis (or Valkey), so exactly one of them serves an archive.
//! `SET NX PX GET` claims, Lua compare-and-set on the ticket, and a served-only cache reset by pub/sub.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dashmap::DashMap;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Script};

use super::{
    ClaimOutcome, DigestMap, KeyDigest, KeyState, Ledger, LedgerError, ResetOutcome, ServedRecord,
    Ticket,
};

/// How long a replica trusts its cached "served" without asking Redis again: the longest a
/// replica can refuse an archive after a reset on another if the reset message is lost.
pub const SERVED_CACHE_TTL: Duration = Duration::from_secs(5);
/// Every Redis command gives up after this, so the archive route fails closed quickly.
const COMMAND_TIMEOUT: Duration = Duration::from_millis(1500);

const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
";
// ARGV[3]: retention in ms, 0 = keep forever.
const COMMIT: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[2])
end
return 1
";
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";
// 1: reset (and published), 2: in flight, 0: unseen.
const RESET: &str = r"
local value = redis.call('GET', KEYS[1])
if not value then return 0 end
if string.sub(value, 1, 2) == 's:' then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', KEYS[2], ARGV[1])
  return 1
end
return 2
";

struct Scripts {
    renew: Script,
    commit: Script,
    release: Script,
    reset: Script,
}

pub struct RedisLedger {
    connection: ConnectionManager,
    prefix: String,
    retention: Option<Duration>,
    scripts: Scripts,
    /// Served keys only, each until the instant it must be asked about again.
    served: Arc<DigestMap<Instant>>,
    subscriber: tokio::task::JoinHandle<()>,
}

impl Drop for RedisLedger {
    fn drop(&mut self) {
        self.subscriber.abort();
    }
}

impl RedisLedger {
    /// Prepares the connection (made lazily and re-made after failures) and the reset listener.
    /// Starting does not need Redis to be up: until it is, the archive route answers 503.
    pub fn new(
        url: &str,
        prefix: &str,
        retention: Option<Duration>,
    ) -> Result<RedisLedger, LedgerError> {
        let client =
            Client::open(url).map_err(|e| LedgerError::Unavailable(format!("store.url: {e}")))?;
        // Each command is bounded by `run`'s own timeout, reconnection included, so the
        // connection keeps no second timer per command.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(None)
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let connection = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|e| LedgerError::Unavailable(e.to_string()))?;
        let served = Arc::new(DashMap::default());
        let channel = format!("{prefix}resets");
        let subscriber = tokio::spawn(listen_for_resets(client, channel, served.clone()));
        Ok(RedisLedger {
            connection,
            prefix: prefix.to_string(),
            retention,
            scripts: Scripts {
                renew: Script::new(RENEW),
                commit: Script::new(COMMIT),
                release: Script::new(RELEASE),
                reset: Script::new(RESET),
            },
            served,
            subscriber,
        })
    }

    fn redis_key(&self, key: &str) -> String {
        // Built by hand: twice per download, and `format!` costs several times as much.
        let mut redis_key = String::with_capacity(self.prefix.len() + 2 + key.len());
        redis_key.push_str(&self.prefix);
        redis_key.push_str("k:");
        redis_key.push_str(key);
        redis_key
    }

    /// `c:` and the ticket's id in 16 lowercase hex digits. Built by hand: twice per download,
    /// and `format!` costs several times as much.
    fn ticket_value(ticket: &Ticket) -> [u8; 18] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut value = *b"c:0000000000000000";
        for (index, digit) in value[2..].iter_mut().enumerate() {
            *digit = HEX[(ticket.id >> (60 - 4 * index)) as usize & 0xf];
        }
        value
    }

    /// `EVALSHA` of `script` for `keys` keys, with room for `args` more arguments of about
    /// `bytes` bytes in all; the keys and arguments follow.
    fn evalsha(script: &Script, keys: usize, args: usize, bytes: usize) -> redis::Cmd {
        let mut command =
            redis::Cmd::with_capacity(3 + keys + args, 16 + script.get_hash().len() + bytes);
        command.arg("EVALSHA").arg(script.get_hash()).arg(keys);
        command
    }

    /// Deletes the key if `ticket` still holds it.
    fn release_command(&self, ticket: &Ticket) -> redis::Cmd {
        let mut command = Self::evalsha(&self.scripts.release, 1, 1, ticket.key.len() + 48);
        command
            .arg(self.redis_key(&ticket.key))
            .arg(&Self::ticket_value(ticket)[..]);
        command
    }

    /// [`run_script`] on this ledger's connection.
    async fn run<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        command: redis::Cmd,
    ) -> Result<T, LedgerError> {
        run_script(self.connection.clone(), script, command).await
    }

    async fn query<T: redis::FromRedisValue>(&self, command: redis::Cmd) -> Result<T, LedgerError> {
        let mut connection = self.connection.clone();
        within_time(send(&mut connection, &command)).await
    }

    fn cache_served(&self, digest: KeyDigest, record: &ServedRecord) {
        let mut until = Instant::now() + SERVED_CACHE_TTL;
        if let Some(retention) = self.retention {
            let left = (record.served_at() + retention)
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default();
            until = until.min(Instant::now() + left);
        }
        self.served.insert(digest, until);
    }

    fn cached(&self, digest: KeyDigest) -> bool {
        self.served
            .get(&digest)
            .is_some_and(|until| *until > Instant::now())
    }

    fn parse_state(key: &str, value: Option<String>) -> KeyState {
        match value {
            None => KeyState::Unseen,
            Some(value) => match value.strip_prefix("s:") {
                Some(json) => KeyState::Served(Arc::new(
                    serde_json::from_str(json)
                        .unwrap_or_else(|_| ServedRecord::unreadable(key, super::now_ms())),
                )),
                None => KeyState::InFlight,
            },
        }
    }
}

/// A claim's ticket until Redis answers the claim. The `SET` may land although its answer never
/// comes back here (the client left and the request was dropped, or the command timed out), and
/// then nobody would hold the key until the lease ran out (`once.inflight_lease`, 10 minutes by
/// default): dropped unanswered, it sends a release after the `SET`. On the same connection the
/// release runs after it; if the `SET` never went out, the release finds nothing of its own.
struct UnansweredClaim<'a> {
    ledger: &'a RedisLedger,
    ticket: Option<Ticket>,
}

impl UnansweredClaim<'_> {
    fn answered(mut self) -> Ticket {
        self.ticket.take().expect("answered once")
    }
}

impl Drop for UnansweredClaim<'_> {
    fn drop(&mut self) {
        let Some(ticket) = self.ticket.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let command = self.ledger.release_command(&ticket);
        let connection = self.ledger.connection.clone();
        let script = self.ledger.scripts.release.clone();
        runtime.spawn(async move {
            if let Err(e) = run_script::<i64>(connection, &script, command).await {
                // Quiet: this fails mostly while Redis is down, when the claim itself failed and
                // its request was already logged as failed; the lease bounds what is left.
                tracing::debug!(key = %ticket.key, error = %e, "could not release an unanswered claim; the key stays in flight until its lease ends");
            }
        });
    }
}

/// Runs a command from `RedisLedger::evalsha`; where Redis does not know the script (a restart,
/// a `SCRIPT FLUSH`), loads it and runs the command again.
async fn run_script<T: redis::FromRedisValue>(
    mut connection: ConnectionManager,
    script: &Script,
    command: redis::Cmd,
) -> Result<T, LedgerError> {
    within_time(async {
        match send(&mut connection, &command).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                script.load_async(&mut connection).await?;
                send(&mut connection, &command).await
            }
            answer => answer,
        }
    })
    .await
}

/// One command's answer. Through the connection manager's own method: `query_async` and
/// `invoke_async` box a 1.3 KiB future per command, past the allocator's per-thread cache.
async fn send<T: redis::FromRedisValue>(
    connection: &mut ConnectionManager,
    command: &redis::Cmd,
) -> redis::RedisResult<T> {
    let value = connection.send_packed_command(command).await?;
    Ok(redis::from_redis_value(value.extract_error()?)?)
}

/// A command's answer, or `Unavailable` when it fails or takes longer than `COMMAND_TIMEOUT`
/// (reconnecting included): the archive route then fails closed at once.
async fn within_time<T>(
    command: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, LedgerError> {
    match tokio::time::timeout(COMMAND_TIMEOUT, command).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(LedgerError::Unavailable(e.to_string())),
        Err(_) => Err(LedgerError::Unavailable(
            "redis did not answer in time".into(),
        )),
    }
}

/// Drops cached keys when any replica resets them. While the subscription is down nothing is
/// heard, so the whole cache is dropped whenever it (re)starts; entries also expire by themselves.
async fn listen_for_resets(client: Client, channel: String, served: Arc<DigestMap<Instant>>) {
    loop {
        if let Ok(Ok(mut pubsub)) =
            tokio::time::timeout(COMMAND_TIMEOUT, client.get_async_pubsub()).await
        {
            if pubsub.subscribe(&channel).await.is_ok() {
                served.clear();
                let mut messages = pubsub.on_message();
                while let Some(message) = messages.next().await {
                    if let Ok(key) = message.get_payload::<String>() {
                        served.remove(&KeyDigest::of(&key));
                    }
                }
            }
        }
        served.clear();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[async_trait]
impl Ledger for RedisLedger {
    fn claim_now(&self, key: &str, _lease: Duration) -> Option<Result<ClaimOutcome, LedgerError>> {
        self.cached(KeyDigest::of(key))
            .then_some(Ok(ClaimOutcome::Served))
    }

    async fn claim(&self, key: &str, lease: Duration) -> Result<ClaimOutcome, LedgerError> {
        let digest = KeyDigest::of(key);
        if self.cached(digest) {
            return Ok(ClaimOutcome::Served);
        }
        let ticket = Ticket {
            key: key.to_string(),
            id: rand::random(),
            digest,
        };
        // One atomic command (Redis 7.0+): set unless present, answering what was there. A
        // plain command costs the server less than a script.
        // Sized up front, so its buffers never grow while the arguments go in.
        let mut command = redis::Cmd::with_capacity(7, self.prefix.len() + key.len() + 48);
        command
            .arg("SET")
            .arg(self.redis_key(key))
            .arg(&Self::ticket_value(&ticket)[..])
            .arg("NX")
            .arg("PX")
            .arg(lease.as_millis().max(1) as u64)
            .arg("GET");
        let unanswered = UnansweredClaim {
            ledger: self,
            ticket: Some(ticket),
        };
        let held = self.query::<Option<String>>(command).await?;
        let ticket = unanswered.answered();
        match held {
            None => Ok(ClaimOutcome::Claimed(ticket)),
            held => match Self::parse_state(key, held) {
                KeyState::Served(record) => {
                    self.cache_served(digest, &record);
                    Ok(ClaimOutcome::Served)
                }
                // Present but unreadable counts as held.
                KeyState::InFlight | KeyState::Unseen => Ok(ClaimOutcome::InFlight),
            },
        }
    }

    async fn renew(&self, ticket: &Ticket, lease: Duration) -> Result<(), LedgerError> {
        let script = &self.scripts.renew;
        let mut command = Self::evalsha(script, 1, 2, ticket.key.len() + 64);
        command
            .arg(self.redis_key(&ticket.key))
            .arg(&Self::ticket_value(ticket)[..])
            .arg(lease.as_millis().max(1) as u64);
        match self.run::<i64>(script, command).await? {
            1 => Ok(()),
            _ => Err(LedgerError::LostClaim(ticket.key.clone())),
        }
    }

    async fn commit(&self, ticket: &Ticket, record: ServedRecord) -> Result<(), LedgerError> {
        // The served value, `s:<json>`, written in one buffer.
        let mut served = Vec::with_capacity(256);
        served.extend_from_slice(b"s:");
        record.write_json(&mut served);
        let retention_ms = self.retention.map_or(0, |r| r.as_millis().max(1) as u64);
        let script = &self.scripts.commit;
        let mut command = Self::evalsha(script, 1, 3, ticket.key.len() + served.len() + 64);
        command
            .arg(self.redis_key(&ticket.key))
            .arg(&Self::ticket_value(ticket)[..])
            .arg(served)
            .arg(retention_ms);
        match self.run::<i64>(script, command).await? {
            1 => {
                self.cache_served(ticket.digest, &record);
                Ok(())
            }
            _ => Err(LedgerError::LostClaim(ticket.key.clone())),
        }
    }

    async fn release(&self, ticket: &Ticket) -> Result<(), LedgerError> {
        let command = self.release_command(ticket);
        self.run::<i64>(&self.scripts.release, command)
            .await
            .map(|_| ())
    }

    async fn lookup(&self, key: &str) -> Result<KeyState, LedgerError> {
        let mut command = redis::cmd("GET");
        command.arg(self.redis_key(key));
        let value = self.query::<Option<String>>(command).await?;
        Ok(Self::parse_state(key, value))
    }

    async fn reset(&self, key: &str) -> Result<ResetOutcome, LedgerError> {
        let script = &self.scripts.reset;
        let mut command = Self::evalsha(script, 2, 1, 2 * key.len() + 3 * self.prefix.len() + 16);
        command
            .arg(self.redis_key(key))
            .arg(format!("{}resets", self.prefix))
            .arg(key);
        let outcome = match self.run::<i64>(script, command).await? {
            1 => ResetOutcome::Reset,
            2 => ResetOutcome::InFlight,
            _ => ResetOutcome::Unseen,
        };
        self.served.remove(&KeyDigest::of(key));
        Ok(outcome)
    }

    async fn ready(&self) -> bool {
        self.query::<String>(redis::cmd("PING")).await.is_ok()
    }

    async fn sweep(&self) {
        let now = Instant::now();
        self.served.retain(|_, until| *until > now);
    }

    async fn flush(&self) -> Result<(), LedgerError> {
        Ok(())
    }
}
