"""Push on PostgreSQL, installed by migration 7: targets, the outbox and the queue's table.

The same tables and rules as the SQLite store's migration 5 (docs/architecture.md, "Push"): a
device's push target, the privacy setting on the user, a `push_preview` stored with the message
and erased with its body, and `push_jobs`, one row per device and chat, marked pending by the
outbox in the transaction that appends a message entry to the device's inbox. The same table is
the queue too (claimed with `FOR UPDATE SKIP LOCKED` by every node's worker, see push.py), or
the outbox a RabbitMQ work queue is fed from (`push.queue = "rabbitmq"`).

The outbox (`push_outbox`) is a statement-level trigger on `inbox` with a transition table: the
message path inserts all the inbox entries of a message in one statement, and a row trigger
would pay a function call and an executor start-up per entry, targets or not. Per statement it
runs one set-based upsert; an entry costs one probe of `push_targets` by primary key, and only
entries of devices with a target go on to read their message's chat. A job is a flag: its upsert
writes only while the job is idle (a burst is one row version; later entries only lock it).

Where the trigger sits, and why:
- The chat of an entry is on its message row. In migration 6's `pigeon_send_batch` the inbox
  entries were inserted before the message row (a statement trigger on inbox would find no
  message to join), so the send batch is replaced here by one that inserts the message row
  first. Every message entry is inserted by it (the single-call `pigeon_send` and the old
  9-argument overload call it), so the outbox sees each of them, as on SQLite.
- Not a trigger on `messages`: nothing leads from a message to its inbox entries but the
  chat's members and their devices (inbox has no index on `message_id`), a walk as long as the
  fan-out for every message, whether or not any device has a target.
- Not a deferred constraint trigger (which would see the message row whatever the order):
  PostgreSQL has only row-level ones, the per-entry cost this design avoids.
The trigger also fires for statements that insert payload entries only (receipts, read states,
chat updates): their upsert reads the transition table and writes nothing.

Concurrency. Every transaction that appends to a device's inbox holds the device's row lock
(functions.py, lock order), so the outbox's upserts of one device never race each other; an
upsert that finds a pending job still locks it (`ON CONFLICT DO UPDATE ... WHERE` locks the row
it skips), and that lock is what the worker's answer relies on: `pigeon_push_answer` locks the
job first and only then, in a statement with a newer snapshot, looks for entries the push did not
cover. A send that committed its entry before that lock is seen; one still running waits for
the answer's commit and then finds the job idle, and marks it pending again. (Read in one
statement, a send that locked the row after the answer's snapshot was taken would be missed,
and its message never pushed.)

`push_policy` holds the worker's grace and window (one row, written by `configure`); readers
take 0 when it has no row.
"""

from __future__ import annotations

V7 = r"""
ALTER TABLE users ADD COLUMN push_names boolean NOT NULL DEFAULT false;
ALTER TABLE messages ADD COLUMN push_preview text;

CREATE TABLE push_targets (
    device_id text COLLATE "C" PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE,
    target text,  -- the PushTarget's JSON (compared as text by remove_gone); NULL: removed
    removed_reason text,
    updated_at bigint NOT NULL
);

-- One row per device and chat. pending: entries wait for a push; due_at: when it may be
-- claimed (grace, window, lease or backoff included); leased_until: the lease of the worker
-- holding it (0: none); last_iseq: what the current or last push covered; invite_iseq: an
-- invitation into the chat waiting for a push (0: none); pushed_at: the last push (window).
CREATE TABLE push_jobs (
    device_id text COLLATE "C" NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    chat_id text COLLATE "C" NOT NULL,
    pending boolean NOT NULL,
    last_iseq bigint NOT NULL DEFAULT 0,
    invite_iseq bigint NOT NULL DEFAULT 0,
    due_at bigint NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    leased_until bigint NOT NULL DEFAULT 0,
    pushed_at bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (device_id, chat_id)
);
-- claims and next_due: one range, however many jobs are held back by a window or a backoff
CREATE INDEX push_jobs_due ON push_jobs (due_at) WHERE pending;
-- idle jobs are forgotten once their window has passed
CREATE INDEX push_jobs_idle ON push_jobs (pushed_at) WHERE NOT pending;

CREATE TABLE push_policy (
    id integer PRIMARY KEY CHECK (id = 1),
    grace_ms bigint NOT NULL,
    window_ms bigint NOT NULL
);
INSERT INTO push_policy VALUES (1, 0, 0);

-- Capped by the queue (the oldest go first): clients can make pushes fail.
CREATE TABLE push_dead (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id text COLLATE "C" NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    chat_id text COLLATE "C" NOT NULL,
    invite_iseq bigint NOT NULL,
    attempts integer NOT NULL,
    error text NOT NULL,
    failed_at bigint NOT NULL
);
CREATE INDEX push_dead_by_device ON push_dead (device_id);  -- a revoked device's cascade

-- The outbox (see the module docstring of push_schema.py). The chat is a subquery by key, run
-- only for entries whose device has a target: a join could hash a scan of messages, and the
-- filter on the chat, were it pushed below the join (OFFSET 0 keeps it above), would probe
-- messages for every entry. Grouped: one upsert per job even if a statement appends several
-- entries of one chat to a device (ON CONFLICT may not touch a row twice).
CREATE FUNCTION pigeon_push_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO push_jobs AS j (device_id, chat_id, pending, due_at)
    SELECT x.device_id, x.chat_id, true,
           min(x.at) + coalesce((SELECT p.grace_ms FROM push_policy p), 0)
    FROM (
        SELECT e.device_id, e.at,
               (SELECT m.chat_id FROM messages m WHERE m.id = e.message_id) AS chat_id
        FROM pigeon_new_entries e
        JOIN push_targets t ON t.device_id = e.device_id
        WHERE e.message_id IS NOT NULL AND t.target IS NOT NULL
        OFFSET 0
    ) x
    WHERE x.chat_id IS NOT NULL
    GROUP BY x.device_id, x.chat_id
    ON CONFLICT (device_id, chat_id) DO UPDATE SET
        pending = true,
        due_at = greatest(excluded.due_at,
                          j.pushed_at + coalesce((SELECT p.window_ms FROM push_policy p), 0))
    WHERE NOT j.pending;
    RETURN NULL;
END $$;
CREATE TRIGGER push_outbox AFTER INSERT ON inbox
REFERENCING NEW TABLE AS pigeon_new_entries
FOR EACH STATEMENT EXECUTE FUNCTION pigeon_push_outbox();

-- A push preview goes with its body: whatever releases a message (an ack batch, a revocation)
-- sets raw to NULL, and this clears the preview in the same row version. A BEFORE ROW trigger
-- fetches (and locks) the old row before its WHEN is evaluated: the ack batch has locked the
-- messages it releases already, so on the hot path that is a check of its own lock; the WHEN
-- then calls the function only for a message that had a preview.
CREATE FUNCTION pigeon_erase_push_preview() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.push_preview := NULL;
    RETURN NEW;
END $$;
CREATE TRIGGER messages_erase_push_preview BEFORE UPDATE OF raw ON messages
FOR EACH ROW WHEN (NEW.raw IS NULL AND OLD.push_preview IS NOT NULL)
EXECUTE FUNCTION pigeon_erase_push_preview();

-- The send batch of migration 6 with the push previews, and the message row inserted before
-- its inbox entries (the outbox trigger reads the chat from it). The message's `pending` is the
-- number of its target devices: all of them are locked and exist (a device cannot be deleted
-- while locked), so the inbox insert writes one entry each; should it not, the batch is run
-- again rather than store a wrong count.
DROP FUNCTION pigeon_send_batch(
    text[], text[], text[], text[], text[], bigint[], bytea[], bytea[], text[]);
CREATE FUNCTION pigeon_send_batch(
    p_ids text[], p_chats text[], p_senders text[], p_devices text[], p_cmids text[],
    p_ats bigint[], p_heads bytea[], p_tails bytea[], p_previews text[], p_push_previews text[]
) RETURNS TABLE (
    o_k integer, o_status integer, o_seq bigint,
    o_devices text[], o_iseqs bigint[],
    o_extra_devices text[], o_extra_iseqs bigint[], o_extra_payloads bytea[],
    o_dup_id text, o_dup_chat text, o_dup_at bigint, o_dup_raw bytea
) LANGUAGE plpgsql AS $$
DECLARE
    k integer;
    v_member boolean;
    v_read bigint;
    v_targets text[];
    v_locked text[];
    v_count integer;
BEGIN
    PERFORM 1 FROM chats c WHERE c.id = ANY(p_chats) ORDER BY c.id FOR NO KEY UPDATE;
    -- every device a send of the batch may write: its chat's members' devices but its own
    -- (the subquery is not flattened, so all of them are locked, sorted)
    SELECT coalesce(array_agg(x.id), '{}') INTO v_locked
    FROM (
        SELECT d.id FROM devices d
        WHERE d.id IN (
            SELECT t.id
            FROM unnest(p_chats, p_devices) AS s(chat, device)
            JOIN members m ON m.chat_id = s.chat
            JOIN devices t ON t.user_id = m.user_id AND t.id <> s.device
        )
        ORDER BY d.id FOR NO KEY UPDATE
    ) x;
    FOR k IN 1 .. cardinality(p_ids) LOOP
        o_k := k;
        o_seq := NULL;
        o_devices := NULL;
        o_iseqs := NULL;
        o_extra_devices := NULL;
        o_extra_iseqs := NULL;
        o_extra_payloads := NULL;
        SELECT m.id, m.chat_id, m.seq, m.at, m.raw
        INTO o_dup_id, o_dup_chat, o_seq, o_dup_at, o_dup_raw
        FROM messages m WHERE m.sender_device = p_devices[k] AND m.cmid = p_cmids[k];
        IF FOUND THEN
            o_status := 1;
            RETURN NEXT;
            CONTINUE;
        END IF;
        SELECT coalesce(bool_or(m.user_id = p_senders[k]), false),
               max(m.read_seq) FILTER (WHERE m.user_id = p_senders[k]),
               ARRAY(SELECT d.id FROM devices d
                     WHERE d.user_id = ANY(array_agg(m.user_id)) AND d.id <> p_devices[k]
                     ORDER BY d.id)
        INTO v_member, v_read, v_targets
        FROM members m
        WHERE m.chat_id = p_chats[k];
        IF NOT v_member THEN
            o_status := CASE WHEN EXISTS (SELECT 1 FROM chats c WHERE c.id = p_chats[k])
                        THEN 3 ELSE 2 END;
            RETURN NEXT;
            CONTINUE;
        END IF;
        IF NOT v_targets <@ v_locked THEN  -- a device registered since the lock: retry
            RAISE EXCEPTION 'send found a device it did not lock; retry'
                USING ERRCODE = 'serialization_failure';
        END IF;
        UPDATE chats c
        SET last_seq = c.last_seq + 1, last_activity_at = p_ats[k], last_sender = p_senders[k]
        WHERE c.id = p_chats[k] RETURNING c.last_seq INTO o_seq;
        v_count := cardinality(v_targets);
        INSERT INTO messages
            (id, chat_id, seq, sender, sender_device, cmid, at, raw, preview, pending,
             push_preview)
        VALUES (p_ids[k], p_chats[k], o_seq, p_senders[k], p_devices[k], p_cmids[k], p_ats[k],
                CASE WHEN v_count > 0
                     THEN p_heads[k] || convert_to(o_seq::text, 'UTF8') || p_tails[k] END,
                p_previews[k], v_count,
                CASE WHEN v_count > 0 THEN p_push_previews[k] END);
        IF v_count > 0 THEN
            WITH b AS (
                UPDATE devices d SET next_iseq = d.next_iseq + 1 WHERE d.id = ANY(v_targets)
                RETURNING d.id, d.next_iseq - 1 AS iseq
            ), i AS (
                INSERT INTO inbox (device_id, iseq, message_id, payload, at)
                SELECT b.id, b.iseq, p_ids[k], NULL, p_ats[k] FROM b
            )
            SELECT array_agg(b.id ORDER BY b.id), array_agg(b.iseq ORDER BY b.id)
            INTO o_devices, o_iseqs
            FROM b;
            IF coalesce(cardinality(o_devices), 0) <> v_count THEN
                RAISE EXCEPTION 'send lost a target device; retry'
                    USING ERRCODE = 'serialization_failure';
            END IF;
        END IF;
        -- as in pigeon_send: read receipts owed by a quick reply, or just the sender's marks
        IF v_read < o_seq - 1 THEN
            SELECT array_agg(a.o_device), array_agg(a.o_iseq), array_agg(a.o_payload)
            INTO o_extra_devices, o_extra_iseqs, o_extra_payloads
            FROM pigeon_advance(p_chats[k], p_senders[k], 'read', o_seq, p_ats[k]) a;
        ELSE
            UPDATE members m SET delivered_seq = o_seq, read_seq = o_seq
            WHERE m.chat_id = p_chats[k] AND m.user_id = p_senders[k];
        END IF;
        o_status := 0;
        o_dup_id := NULL;
        o_dup_chat := NULL;
        o_dup_at := NULL;
        o_dup_raw := NULL;
        RETURN NEXT;
    END LOOP;
END $$;

-- Nodes of the previous version call the 9-argument batch during a rolling upgrade: their
-- sends carry no push preview.
CREATE FUNCTION pigeon_send_batch(
    p_ids text[], p_chats text[], p_senders text[], p_devices text[], p_cmids text[],
    p_ats bigint[], p_heads bytea[], p_tails bytea[], p_previews text[]
) RETURNS TABLE (
    o_k integer, o_status integer, o_seq bigint,
    o_devices text[], o_iseqs bigint[],
    o_extra_devices text[], o_extra_iseqs bigint[], o_extra_payloads bytea[],
    o_dup_id text, o_dup_chat text, o_dup_at bigint, o_dup_raw bytea
) LANGUAGE sql AS $$
    SELECT * FROM pigeon_send_batch(p_ids, p_chats, p_senders, p_devices, p_cmids, p_ats,
                                    p_heads, p_tails, p_previews, NULL::text[])
$$;

CREATE OR REPLACE FUNCTION pigeon_send(
    p_id text, p_chat text, p_sender text, p_device text, p_cmid text, p_at bigint,
    p_head bytea, p_tail bytea, p_preview text,
    OUT o_status integer, OUT o_seq bigint,
    OUT o_devices text[], OUT o_iseqs bigint[],
    OUT o_extra_devices text[], OUT o_extra_iseqs bigint[], OUT o_extra_payloads bytea[],
    OUT o_dup_id text, OUT o_dup_chat text, OUT o_dup_at bigint, OUT o_dup_raw bytea
) LANGUAGE sql AS $$
    SELECT b.o_status, b.o_seq, b.o_devices, b.o_iseqs, b.o_extra_devices, b.o_extra_iseqs,
           b.o_extra_payloads, b.o_dup_id, b.o_dup_chat, b.o_dup_at, b.o_dup_raw
    FROM pigeon_send_batch(ARRAY[p_id], ARRAY[p_chat], ARRAY[p_sender], ARRAY[p_device],
                           ARRAY[p_cmid], ARRAY[p_at], ARRAY[p_head], ARRAY[p_tail],
                           ARRAY[p_preview], NULL::text[]) b
$$;

-- PushQueue.done and .dead: end the job's lease (false if it is no longer `p_lease`). Idle
-- again, or pending if entries of the chat came after what the push covered (due after a grace
-- from `p_now`, and the window if it was pushed). The job is locked first; the inbox is read by
-- the next statement, with a snapshot taken after the lock (module docstring). With
-- `p_error`, a dead letter is recorded too, and the oldest beyond `p_keep` are dropped.
CREATE FUNCTION pigeon_push_answer(
    p_device text, p_chat text, p_lease bigint, p_now bigint, p_pushed boolean,
    p_error text, p_invite_iseq bigint, p_attempts integer, p_keep bigint
) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    v_grace bigint;
    v_window bigint;
    v_pushed_at bigint;
BEGIN
    SELECT j.pushed_at INTO v_pushed_at FROM push_jobs j
    WHERE j.device_id = p_device AND j.chat_id = p_chat AND j.leased_until = p_lease
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    SELECT coalesce(max(p.grace_ms), 0), coalesce(max(p.window_ms), 0)
    INTO v_grace, v_window FROM push_policy p;
    IF p_pushed THEN
        v_pushed_at := p_now;
    END IF;
    UPDATE push_jobs j SET
        pending = j.invite_iseq > j.last_iseq OR EXISTS (
            SELECT 1 FROM inbox i JOIN messages m ON m.id = i.message_id
            WHERE i.device_id = j.device_id AND i.iseq > j.last_iseq AND m.chat_id = j.chat_id
        ),
        invite_iseq = CASE WHEN j.invite_iseq > j.last_iseq THEN j.invite_iseq ELSE 0 END,
        attempts = 0,
        leased_until = 0,
        due_at = greatest(p_now + v_grace, v_pushed_at + v_window),
        pushed_at = v_pushed_at
    WHERE j.device_id = p_device AND j.chat_id = p_chat;
    IF p_error IS NOT NULL THEN
        INSERT INTO push_dead (device_id, chat_id, invite_iseq, attempts, error, failed_at)
        VALUES (p_device, p_chat, p_invite_iseq, p_attempts, p_error, p_now);
        DELETE FROM push_dead WHERE id <= (SELECT max(id) FROM push_dead) - p_keep;
    END IF;
    RETURN true;
END $$;
"""
