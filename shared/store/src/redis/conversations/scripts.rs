//! The Lua scripts of the conversations' store: each step that must read and write in one go,
//! on the keys of one slot (a conversation's, or an agent's leads), and one that joins two
//! steps where every key is on one server.

use std::sync::LazyLock;

use redis::Script;

/// The lead step, as a Lua function of its keys (`K` from `K[ko + 1]`) and arguments (`A`
/// from `A[ao + 1]`), so that one server can run it in the same script as the turn's begin
/// ([`BEGIN_TURN_AND_LEAD`]) and a cluster, where its keys are in another slot, in a script of
/// its own ([`RECORD_LEAD`]). Keys: lead hash, leads by first contact, then one "seen" mark per
/// message; arguments: user, ttl (s), then per message its profile name and time (ms). Returns
/// the messages counted, plus 1,000,000 when this call made the lead. Each `redis.call` costs
/// Redis a few µs whatever it does, so fields are read and written together; and each Lua
/// table built costs about as much, so none is (offsets instead of copies of KEYS and ARGV).
macro_rules! record_lead_fn {
    () => {
        r#"
local function record_lead(K, ko, A, ao)
  local lead = K[ko + 1]
  local user = A[ao + 1]
  local counted = 0
  local created = 0
  for i = 3, #K - ko do
    local profile = A[ao + 2 * i - 3]
    local at_text = A[ao + 2 * i - 2]
    if redis.call('SET', K[ko + i], '1', 'NX', 'EX', A[ao + 2]) then
      local at = tonumber(at_text)
      local seen = redis.call('HMGET', lead, 'first_seen', 'last_seen', 'message_count')
      local count = tonumber(seen[3] or '0') + 1
      -- The fields to write, as one HSET: a later time moves last_seen, a name replaces it.
      local last = at_text
      if seen[1] then
        if at < tonumber(seen[1]) then
          redis.call('ZADD', K[ko + 2], at, user)
          redis.call('HSET', lead, 'first_seen', at_text)
        end
        if at <= tonumber(seen[2] or '0') then last = seen[2] end
      else
        created = 1000000
        redis.call('ZADD', K[ko + 2], at, user)
        redis.call('HSET', lead, 'phone', user, 'first_seen', at_text)
      end
      if profile ~= '' then
        redis.call('HSET', lead, 'last_seen', last, 'message_count', count, 'profile_name', profile)
      else
        redis.call('HSET', lead, 'last_seen', last, 'message_count', count)
      end
      counted = counted + 1
    end
  end
  return counted + created
end
"#
    };
}

/// The begin step, as a Lua function (see [`record_lead_fn`]). Keys: window clock, session
/// list, pause, then the turn records of the messages; arguments: latest message time (ms),
/// turns of history wanted, as digits (a Lua number would lose digits, and LRANGE takes no
/// exponent). The clock, the pause and the records are read in one `MGET` (which answers nil
/// for the list). Returns the records (false for none), the history and the pause (false for
/// none), which reach the client as nil. The history goes back as one JSON array, its turns
/// joined in Lua, rather than a bulk string per turn: each element of an answer costs Redis
/// (turned into Lua and back) and the client (the redis crate parses byte by byte) far more
/// than its share of one string that serde_json reads at once.
macro_rules! begin_turn_fn {
    () => {
        r#"
local function begin_turn(K, n, A, ao)
  local got = redis.call('MGET', unpack(K, 1, n))
  if tonumber(A[ao + 1]) > tonumber(got[1] or '0') then redis.call('SET', K[1], A[ao + 1]) end
  local done = {}
  local fresh = false
  for i = 4, n do
    done[i - 3] = got[i]
    if not got[i] then fresh = true end
  end
  local history = '[]'
  if fresh and A[ao + 2] ~= '0' then
    history = '[' .. table.concat(redis.call('LRANGE', K[2], '-' .. A[ao + 2], -1), ',') .. ']'
  end
  return done, history, got[3]
end
"#
    };
}

const RECORD_LEAD: &str = concat!(record_lead_fn!(), "return record_lead(KEYS, 0, ARGV, 0)");

const BEGIN_TURN: &str = concat!(
    begin_turn_fn!(),
    r#"
local done, history, pause = begin_turn(KEYS, #KEYS, ARGV, 0)
return {done, history, pause}
"#
);

// Both steps in one script, for one server (or Sentinel's master), where keys of any slots may
// go together. ARGV[1] = how many of the keys are the begin's; then the begin's two arguments,
// then the lead's; the keys are the begin's, then the lead's. Returns the begin's answer with
// the lead's appended.
const BEGIN_TURN_AND_LEAD: &str = concat!(
    begin_turn_fn!(),
    record_lead_fn!(),
    r#"
local n = tonumber(ARGV[1])
local done, history, pause = begin_turn(KEYS, n, ARGV, 1)
return {done, history, pause, record_lead(KEYS, n, ARGV, 3)}
"#
);

// KEYS[1] = session list, KEYS[2] = the session's set of turn record keys (so that erasing the
// user finds them without a SCAN), KEYS[3..] = turn records; ARGV[1] = record, ARGV[2] = ttl,
// ARGV[3] = number of turns n, ARGV[4..3+n] = turns, ARGV[4+n] = how long history is kept (s),
// ARGV[5+n] = the retention cutoff (`retention_cutoff`), ARGV[6+n] = turns to drop at most.
// Returns the earlier record, or nil when this one was stored.
const COMPLETE_TURN: &str = r#"
local prev = redis.call('GET', KEYS[3])
if prev then return prev end
local n = tonumber(ARGV[3])
if n > 0 then redis.call('RPUSH', KEYS[1], unpack(ARGV, 4, 3 + n)) end
for i = 3, #KEYS do redis.call('SET', KEYS[i], ARGV[1], 'EX', ARGV[2]) end
redis.call('SADD', KEYS[2], unpack(KEYS, 3, #KEYS))
redis.call('EXPIRE', KEYS[2], ARGV[2])
local cutoff = ARGV[5 + n]
for _ = 1, tonumber(ARGV[6 + n]) do
  local head = redis.call('LINDEX', KEYS[1], 0)
  if not head then break end
  local ok, turn = pcall(cjson.decode, head)
  if not ok or type(turn) ~= 'table' or type(turn['at']) ~= 'string' then break end
  if string.sub(turn['at'], 1, 19) >= cutoff then break end
  redis.call('LPOP', KEYS[1])
end
redis.call('EXPIRE', KEYS[1], ARGV[4 + n])
return false
"#;

// KEYS[1] = a lead hash; ARGV[1] = field, ARGV[2] = time (ms): the field moves forward to it,
// on a lead that exists only.
const STAMP_LEAD: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > cur then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 1
"#;

// KEYS[1] = a clock (ms); ARGV[1] = a time (ms): the clock moves forward to it, never back.
const STAMP_MAX: &str = r#"
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > cur then redis.call('SET', KEYS[1], ARGV[1]) end
return 1
"#;

/// This module's scripts, hashed once: `EVALSHA` needs the SHA-1 of the script's text.
pub(super) static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    record_lead: Script::new(RECORD_LEAD),
    begin_turn: Script::new(BEGIN_TURN),
    begin_turn_and_lead: Script::new(BEGIN_TURN_AND_LEAD),
    complete_turn: Script::new(COMPLETE_TURN),
    stamp_lead: Script::new(STAMP_LEAD),
    stamp_max: Script::new(STAMP_MAX),
});

pub(super) struct Scripts {
    pub(super) record_lead: Script,
    pub(super) begin_turn: Script,
    pub(super) begin_turn_and_lead: Script,
    pub(super) complete_turn: Script,
    pub(super) stamp_lead: Script,
    pub(super) stamp_max: Script,
}
