"""The batch functions of the message path made set-based, installed by migration 9.

Migration 6's `pigeon_send_batch` and `pigeon_ack_batch` (as migration 7 left the send) took
their locks once per batch but then ran each element's statements one after another: about six
statements per send and per ack, each paying an executor start-up that cost more than the few
index probes it ran. Here a batch runs a fixed handful of statements over all its elements
(arrays unnested, `INSERT ... SELECT`, `UPDATE ... FROM`, data-modifying CTEs), whatever its
size; the outbox trigger on inbox fires once per batch. The signatures, the answers and the
rules are those of the loops they replace, so nodes of the previous version (and the
single-call and 9-argument wrappers, which call these) keep working during a rolling upgrade.

- send: lock the chats; lock the devices; plan (dedupe, membership, seqs, targets, iseqs);
  only if a send is a quick reply, its read receipts; write (chats, messages, marks, counters,
  inbox entries); answer.
- ack: find what the acks reach (no locks); lock the chats; lock the devices; drop the entries
  and move the acks; move the delivered marks and write the receipts; lock and release the
  messages whose last entry went.

A batch is still one transaction, and its outcome is the one of its elements run in batch order
(`o_k`), which the statements compute with window functions over that order:
- seq: a chat's sends take `last_seq + 1, + 2, ...` in batch order, under the chat's lock.
- iseq: every entry of the batch is ranked per device, by element and then as the loop appended
  it (a send's message before the read receipts it owes; an ack's receipts chat by chat), and a
  device takes `next_iseq + rank - 1` under its lock, so within one chat a device's entries
  keep the seq order, and its counter has no gap.
- idempotency: a send whose (sender_device, cmid) is stored is a duplicate of it; among sends of
  the batch with the same pair, the first that may be sent is sent, those after it are its
  duplicates (answered with its stored row, read after the writes), and those before it fail
  with their own error.
- marks: a sender's read mark before a send is its previous send in the chat in this batch, or
  the stored one; a quick reply (a mark behind the previous seq) writes the read receipts owed,
  with `all_seq` as the marks stood at that element. An ack's delivered mark moves per user and
  chat as the running maximum of the batch's acks (several devices of a user in one batch move
  it once); receipts' `all_seq` is computed from the marks as of that ack.
- acks of one device in one batch each drop what the earlier ones left. An ack's entries are
  those its device had before the batch: an ack beyond the device's head does not remove a
  receipt that an earlier ack of the same batch appended to it (the loop did; that receipt now
  waits for the next ack, as if this ack had come first).

Locks and their order are those of migration 6 (chats by id -> devices by id -> messages by id,
each kind locked sorted, before any write): the statements after the locks only write rows the
batch has locked, rows under those locks (members' marks, the receipt log, inbox entries), and
new messages. What the plan finds that the locks did not cover (a device registered, an entry
committed, a member changed in between) raises `serialization_failure` with nothing written,
and the batch is run again. A plan is carried from statement to statement in arrays of the
composite types below (no temporary table: catalog writes per call), zipped with the arguments
by position.
"""

from __future__ import annotations

V9 = r"""
-- One element of a send batch as planned. status: 0 sent, 1 duplicate, 2 no such chat, 3 not a
-- participant; seq: the message's (a stored duplicate's: its original's); n: its inbox
-- entries; quick: it passes messages of others its sender had not read (it owes read
-- receipts); read_before: its sender's read mark just before it; dup_*: a stored original.
CREATE TYPE pigeon_send_plan AS (
    k integer, status integer, seq bigint, n integer, quick boolean, read_before bigint,
    dup_id text, dup_chat text, dup_at bigint, dup_raw bytea
);

-- An inbox entry a batch appends for its element k: a message's entry or a payload.
CREATE TYPE pigeon_entry AS (
    k integer, device text, iseq bigint, message_id text, payload bytea, at bigint
);

-- Element k of an ack batch reached chat_id up to seq (for user_id's delivered mark).
CREATE TYPE pigeon_ack_step AS (
    k integer, user_id text, chat_id text, seq bigint, at bigint
);

-- Planner settings of both functions: a batch is a few dozen rows against tables that grow
-- without bound, and a function's plans are made once per connection, maybe while those tables
-- are small (where hashing the batch against a scan of a table looks cheaper), then kept. So
-- every table is read by plain index probes in nested loops, as the per-element statements
-- were, and no statement joins two sets of the batch to each other (they would loop over each
-- other): the batch's sets meet in window functions, in groups, or zipped by position.
CREATE OR REPLACE FUNCTION pigeon_send_batch(
    p_ids text[], p_chats text[], p_senders text[], p_devices text[], p_cmids text[],
    p_ats bigint[], p_heads bytea[], p_tails bytea[], p_previews text[], p_push_previews text[]
) RETURNS TABLE (
    o_k integer, o_status integer, o_seq bigint,
    o_devices text[], o_iseqs bigint[],
    o_extra_devices text[], o_extra_iseqs bigint[], o_extra_payloads bytea[],
    o_dup_id text, o_dup_chat text, o_dup_at bigint, o_dup_raw bytea
) LANGUAGE plpgsql
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off
SET enable_mergejoin = off AS $$
DECLARE
    v_locked text[];
    v_plan pigeon_send_plan[];
    v_entries pigeon_entry[];
    v_covered boolean;
    v_quick boolean;
    v_complete boolean;
BEGIN
    -- Locks, as in migration 6: the chats, then every device a send may write (its chat's
    -- members' devices but the sending one; the subquery is not flattened: all are locked).
    PERFORM 1 FROM chats c WHERE c.id = ANY(p_chats) ORDER BY c.id FOR NO KEY UPDATE;
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

    -- The plan, read after the locks (membership and counters as last committed), and the
    -- message entries, a device's taking its next iseqs in batch order.
    WITH e AS (
        SELECT u.k::integer AS k, u.id, u.chat, u.sender, u.device, u.cmid, u.at
        FROM unnest(p_ids, p_chats, p_senders, p_devices, p_cmids, p_ats)
             WITH ORDINALITY AS u(id, chat, sender, device, cmid, at, k)
    ), f AS (  -- what each send finds: its chat, its sender's member row, a stored original
        SELECT e.*, c.id IS NOT NULL AS chat_found, c.last_seq,
               me.user_id IS NOT NULL AS member, me.read_seq,
               o.id AS o_id, o.chat_id AS o_chat, o.seq AS o_seq, o.at AS o_at, o.raw AS o_raw
        FROM e
        LEFT JOIN chats c ON c.id = e.chat
        LEFT JOIN members me ON me.chat_id = e.chat AND me.user_id = e.sender
        LEFT JOIN messages o ON o.sender_device = e.device AND o.cmid = e.cmid
    ), g AS (  -- of the sends of one (device, cmid), the first that may be sent is sent
        SELECT f.*,
               min(f.k) FILTER (WHERE f.member AND f.o_id IS NULL)
                   OVER (PARTITION BY f.device, f.cmid) AS first
        FROM f
    ), s AS (  -- seqs in batch order per chat
        SELECT g.*, coalesce(g.k = g.first, false) AS sent,
               g.last_seq + count(*) FILTER (WHERE g.k = g.first)
                                OVER (PARTITION BY g.chat ORDER BY g.k) AS next_seq
        FROM g
    ), q AS (  -- the sender's read mark just before each send
        SELECT s.*, CASE WHEN s.sent THEN s.next_seq END AS seq,
               coalesce(max(CASE WHEN s.sent THEN s.next_seq END)
                            OVER (PARTITION BY s.chat, s.sender ORDER BY s.k
                                  ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING),
                        s.read_seq) AS read_before
        FROM s
    ), t AS (  -- each send's targets: every device of the chat's members but the sending one
        SELECT q.*, tg.devices, tg.bases
        FROM q
        LEFT JOIN LATERAL (
            SELECT array_agg(d.id) AS devices, array_agg(d.next_iseq) AS bases
            FROM members mm JOIN devices d ON d.user_id = mm.user_id
            WHERE q.sent AND mm.chat_id = q.chat AND d.id <> q.device
        ) tg ON true
    ), y AS (
        SELECT t.k, x.device, x.base - 1 + row_number() OVER (PARTITION BY x.device ORDER BY t.k)
                                            AS iseq,
               t.id, t.at
        FROM t CROSS JOIN LATERAL unnest(t.devices, t.bases) AS x(device, base)
    )
    SELECT
        (SELECT array_agg(ROW(
             t.k,
             CASE WHEN t.sent THEN 0 WHEN t.o_id IS NOT NULL OR t.first < t.k THEN 1
                  WHEN t.chat_found THEN 3 ELSE 2 END,
             coalesce(t.o_seq, t.seq), coalesce(cardinality(t.devices), 0),
             t.sent AND t.read_before < t.seq - 1, t.read_before,
             t.o_id, t.o_chat, t.o_at, t.o_raw
         )::pigeon_send_plan ORDER BY t.k) FROM t),
        (SELECT array_agg(ROW(y.k, y.device, y.iseq, y.id, NULL, y.at)::pigeon_entry) FROM y),
        (SELECT coalesce(bool_and(y.device = ANY(v_locked)), true) FROM y),
        (SELECT coalesce(bool_or(t.sent AND t.read_before < t.seq - 1), false) FROM t)
    INTO v_plan, v_entries, v_covered, v_quick;

    -- Quick replies (rare): their read receipts, one per sender (still a member) of the
    -- messages of others they pass, to each of that sender's devices; all_seq: the lowest read
    -- mark of the others (the replier's is now its seq) as it stands at that send: the first
    -- of the three lowest marks after it that is neither the writer's nor the replier's. A
    -- device's entries are ranked again: by element, a message before the receipts its send
    -- owes. The replies' read marks go to the receipt log here (a failed check below rolls it
    -- back).
    IF v_quick THEN
        WITH s AS (
            SELECT u.k, u.chat, u.sender, u.at, u.seq, u.quick, u.read_before
            FROM unnest(p_chats, p_senders, p_ats, v_plan)
                 AS u(chat, sender, at, k, status, seq, n, quick, read_before)
            WHERE u.status = 0
        ), grid AS (  -- in the chats of quick replies: every member's read mark after each send
            SELECT s.k, s.chat, s.sender, s.at, s.seq, s.quick, s.read_before, o.user_id,
                   greatest(o.read_seq, max(CASE WHEN s.sender = o.user_id THEN s.seq END)
                                            OVER (PARTITION BY s.chat, o.user_id ORDER BY s.k))
                       AS after
            FROM s JOIN members o ON o.chat_id = s.chat
            WHERE s.chat IN (SELECT s2.chat FROM s s2 WHERE s2.quick)
        ), ranked AS (
            SELECT grid.*,
                   row_number() OVER (PARTITION BY grid.k ORDER BY grid.after, grid.user_id)
                       AS r
            FROM grid
        ), q AS (  -- the quick replies, and the three lowest marks after each
            SELECT ranked.k, ranked.chat, ranked.sender, ranked.at, ranked.seq,
                   ranked.read_before,
                   max(ranked.user_id) FILTER (WHERE ranked.r = 1) AS u1,
                   max(ranked.after) FILTER (WHERE ranked.r = 1) AS m1,
                   max(ranked.user_id) FILTER (WHERE ranked.r = 2) AS u2,
                   max(ranked.after) FILTER (WHERE ranked.r = 2) AS m2,
                   max(ranked.user_id) FILTER (WHERE ranked.r = 3) AS u3,
                   max(ranked.after) FILTER (WHERE ranked.r = 3) AS m3
            FROM ranked
            WHERE ranked.quick AND ranked.r <= 3
            GROUP BY ranked.k, ranked.chat, ranked.sender, ranked.at, ranked.seq,
                     ranked.read_before
        ), rd AS (  -- all_seq leaves out the writer and the replier (whose mark is now seq)
            SELECT q.k, d.id AS device, d.next_iseq AS base, q.at,
                   pigeon_receipt_json(q.chat, q.sender, 'read', q.seq, least(q.seq,
                       CASE WHEN q.u1 NOT IN (rw.writer, q.sender) THEN q.m1
                            WHEN q.u2 NOT IN (rw.writer, q.sender) THEN q.m2
                            WHEN q.u3 NOT IN (rw.writer, q.sender) THEN q.m3 END), q.at)
                       AS payload
            FROM q
            CROSS JOIN LATERAL (
                SELECT x.sender AS writer FROM messages x
                WHERE x.chat_id = q.chat AND x.seq > q.read_before AND x.sender <> q.sender
                UNION
                SELECT b.sender FROM s b
                WHERE b.chat = q.chat AND b.seq > q.read_before AND b.seq < q.seq
                  AND b.sender <> q.sender
            ) rw
            JOIN devices d ON d.user_id = rw.writer
            WHERE EXISTS (
                SELECT 1 FROM members wm WHERE wm.chat_id = q.chat AND wm.user_id = rw.writer)
        ), x AS (
            SELECT en.k, en.device, d.next_iseq AS base, 0 AS phase, en.message_id,
                   NULL::bytea AS payload, en.at
            FROM unnest(v_entries) en JOIN devices d ON d.id = en.device
            UNION ALL
            SELECT rd.k, rd.device, rd.base, 1, NULL, rd.payload, rd.at FROM rd
        ), y AS (
            SELECT x.*,
                   x.base - 1 + row_number() OVER (PARTITION BY x.device ORDER BY x.k, x.phase)
                       AS iseq
            FROM x
        ), rl AS (
            INSERT INTO receipt_log (chat_id, user_id, kind, seq, at)
            SELECT q.chat, q.sender, 'read', q.seq, q.at FROM q
            ON CONFLICT (chat_id, user_id, kind, seq) DO UPDATE SET at = excluded.at
        )
        SELECT array_agg(ROW(y.k, y.device, y.iseq, y.message_id, y.payload, y.at)
                         ::pigeon_entry),
               coalesce(bool_and(y.device = ANY(v_locked)), true)
        INTO v_entries, v_covered
        FROM y;
    END IF;
    IF NOT v_covered THEN  -- a device registered since the lock: run again
        RAISE EXCEPTION 'send found a device it did not lock; retry'
            USING ERRCODE = 'serialization_failure';
    END IF;

    -- The writes, the sends' arguments zipped with their plan. The message rows go in with the
    -- entries' statement: the outbox trigger on inbox fires at its end and finds their chats.
    WITH p AS (
        SELECT u.id, u.chat, u.sender, u.device, u.cmid, u.at, u.head, u.tail, u.preview,
               u.push_preview, u.k, u.seq, u.n
        FROM unnest(p_ids, p_chats, p_senders, p_devices, p_cmids, p_ats, p_heads, p_tails,
                    p_previews, p_push_previews, v_plan)  -- (the plan's columns come last)
             AS u(id, chat, sender, device, cmid, at, head, tail, preview, push_preview,
                  k, status, seq, n)
        WHERE u.status = 0
    ), c AS (  -- the chat's last send of the batch sets its activity
        UPDATE chats c SET last_seq = l.seq, last_activity_at = l.at, last_sender = l.sender
        FROM (SELECT DISTINCT ON (p.chat) p.chat, p.seq, p.at, p.sender
              FROM p ORDER BY p.chat, p.k DESC) l
        WHERE c.id = l.chat
    ), m AS (
        INSERT INTO messages
            (id, chat_id, seq, sender, sender_device, cmid, at, raw, preview, pending,
             push_preview)
        SELECT p.id, p.chat, p.seq, p.sender, p.device, p.cmid, p.at,
               CASE WHEN p.n > 0 THEN p.head || convert_to(p.seq::text, 'UTF8') || p.tail END,
               p.preview, p.n, CASE WHEN p.n > 0 THEN p.push_preview END
        FROM p
    ), mk AS (  -- the sender has read everything up to its last send
        UPDATE members me
        SET delivered_seq = greatest(me.delivered_seq, l.seq), read_seq = l.seq
        FROM (SELECT p.chat, p.sender, max(p.seq) AS seq FROM p GROUP BY p.chat, p.sender) l
        WHERE me.chat_id = l.chat AND me.user_id = l.sender
    ), en AS (
        SELECT * FROM unnest(v_entries)
    ), b AS (  -- the counters move past the entries (from where the plan read them)
        UPDATE devices d SET next_iseq = l.last + 1
        FROM (SELECT en.device, min(en.iseq) AS first, max(en.iseq) AS last
              FROM en GROUP BY en.device) l
        WHERE d.id = l.device AND d.next_iseq = l.first
        RETURNING d.id
    ), i AS (
        INSERT INTO inbox (device_id, iseq, message_id, payload, at)
        SELECT en.device, en.iseq, en.message_id, en.payload, en.at FROM en
    )
    SELECT (SELECT count(*) FROM b) = (SELECT count(DISTINCT en.device) FROM en)
    INTO v_complete;
    -- every target is locked and exists (a locked device cannot be deleted); should one be
    -- missing, run again rather than store a wrong count
    IF NOT v_complete THEN
        RAISE EXCEPTION 'send lost a target device; retry'
            USING ERRCODE = 'serialization_failure';
    END IF;

    -- The answers, an element's entries gathered by a group per element (its plan row, then
    -- its entries). A duplicate of a send of the batch answers with that send's stored row,
    -- read now that it is written, as a resend after the batch would find it.
    RETURN QUERY
    SELECT a.k, a.status, coalesce(a.seq, o.seq), a.devices, a.iseqs,
           a.extra_devices, a.extra_iseqs, a.extra_payloads,
           coalesce(a.dup_id, o.id), coalesce(a.dup_chat, o.chat_id), coalesce(a.dup_at, o.at),
           CASE WHEN a.dup_id IS NOT NULL THEN a.dup_raw ELSE o.raw END
    FROM (
        SELECT z.k, max(z.status) AS status, max(z.seq) AS seq,
               max(z.dup_id) AS dup_id, max(z.dup_chat) AS dup_chat, max(z.dup_at) AS dup_at,
               (array_agg(z.dup_raw) FILTER (WHERE z.status IS NOT NULL))[1] AS dup_raw,
               array_agg(z.device) FILTER (WHERE z.message_id IS NOT NULL) AS devices,
               array_agg(z.iseq) FILTER (WHERE z.message_id IS NOT NULL) AS iseqs,
               array_agg(z.device) FILTER (WHERE z.payload IS NOT NULL) AS extra_devices,
               array_agg(z.iseq) FILTER (WHERE z.payload IS NOT NULL) AS extra_iseqs,
               array_agg(z.payload) FILTER (WHERE z.payload IS NOT NULL) AS extra_payloads
        FROM (
            SELECT x.k, x.status, x.seq, x.dup_id, x.dup_chat, x.dup_at, x.dup_raw,
                   NULL::text AS device, NULL::bigint AS iseq, NULL::text AS message_id,
                   NULL::bytea AS payload
            FROM unnest(v_plan) x
            UNION ALL
            SELECT en.k, NULL, NULL, NULL, NULL, NULL, NULL,
                   en.device, en.iseq, en.message_id, en.payload
            FROM unnest(v_entries) en
        ) z
        GROUP BY z.k
    ) a
    LEFT JOIN LATERAL (
        SELECT m.id, m.chat_id, m.seq, m.at, m.raw FROM messages m
        WHERE a.status = 1 AND a.dup_id IS NULL
          AND m.sender_device = p_devices[a.k] AND m.cmid = p_cmids[a.k]
    ) o ON true
    ORDER BY a.k;
END $$;

CREATE OR REPLACE FUNCTION pigeon_ack_batch(p_devices text[], p_uptos bigint[], p_ats bigint[])
RETURNS TABLE (o_k integer, o_device text, o_iseq bigint, o_payload bytea)
LANGUAGE plpgsql
-- (and groups hashed rather than sorted: the grid of a group's marks below is the one large set)
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off
SET enable_mergejoin = off SET enable_sort = off AS $$
DECLARE
    v_chats text[];
    v_devices text[];
    v_ids text[];
    v_counts integer[];
    v_steps pigeon_ack_step[];
    v_entries pigeon_entry[];
    v_covered boolean;
    v_complete boolean;
BEGIN
    -- Snapshot read, no locks yet (as migration 6): the chats whose delivered marks move, and
    -- the devices of the senders who get a receipt, for all the acks.
    WITH a AS (
        SELECT u.device, u.upto, d.user_id
        FROM unnest(p_devices, p_uptos) AS u(device, upto)
        JOIN devices d ON d.id = u.device
        WHERE u.upto > d.acked_iseq
    ), reached AS (
        SELECT a.user_id, m.chat_id, max(m.seq) AS seq
        FROM a
        JOIN inbox i ON i.device_id = a.device AND i.iseq <= a.upto
        JOIN messages m ON m.id = i.message_id
        GROUP BY a.user_id, m.chat_id
    ), moving AS (
        SELECT r.chat_id, r.user_id, r.seq, me.delivered_seq AS old
        FROM reached r
        JOIN members me ON me.chat_id = r.chat_id AND me.user_id = r.user_id
        WHERE r.seq > me.delivered_seq
    )
    SELECT (SELECT array_agg(DISTINCT mv.chat_id) FROM moving mv),
           (SELECT array_agg(DISTINCT d.id)
            FROM moving mv
            JOIN messages x ON x.chat_id = mv.chat_id AND x.seq > mv.old AND x.seq <= mv.seq
            JOIN devices d ON d.user_id = x.sender
            WHERE x.sender <> mv.user_id)
    INTO v_chats, v_devices;
    v_chats := coalesce(v_chats, '{}');
    v_devices := coalesce(v_devices, '{}');
    IF cardinality(v_chats) > 0 THEN
        PERFORM 1 FROM chats c WHERE c.id = ANY(v_chats) ORDER BY c.id FOR NO KEY UPDATE;
    END IF;
    PERFORM 1 FROM devices d WHERE d.id = ANY(v_devices || p_devices)
    ORDER BY d.id FOR NO KEY UPDATE;

    -- Drop the entries and move the acks: each ack covers what its device had not acked before
    -- it, in the batch or committed (counters as of the lock). Back come the messages
    -- released and the highest seq each ack reached per chat.
    WITH a AS (
        SELECT u.k::integer AS k, u.device, u.upto, u.at
        FROM unnest(p_devices, p_uptos, p_ats) WITH ORDINALITY AS u(device, upto, at, k)
    ), s AS (
        SELECT a.k, a.device, a.upto, a.at, d.user_id, d.next_iseq,
               greatest(d.acked_iseq, max(a.upto) OVER (
                   PARTITION BY a.device ORDER BY a.k
                   ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)) AS after
        FROM a JOIN devices d ON d.id = a.device
    ), go AS (
        SELECT s.* FROM s WHERE s.upto > s.after
    ), gone AS (
        DELETE FROM inbox i USING go
        WHERE i.device_id = go.device AND i.iseq > go.after AND i.iseq <= go.upto
        RETURNING go.k, go.user_id, go.at, i.message_id
    ), moved AS (
        UPDATE devices d SET acked_iseq = least(l.upto, l.next_iseq - 1)
        FROM (SELECT go.device, max(go.upto) AS upto, max(go.next_iseq) AS next_iseq
              FROM go GROUP BY go.device) l
        WHERE d.id = l.device
    ), msg AS (
        SELECT gone.k, gone.user_id, gone.at, gone.message_id, m.chat_id, m.seq
        FROM gone JOIN messages m ON m.id = gone.message_id
    )
    SELECT x.ids, x.counts, y.steps INTO v_ids, v_counts, v_steps
    FROM (SELECT array_agg(c.message_id) AS ids, array_agg(c.n) AS counts
          FROM (SELECT msg.message_id, count(*)::integer AS n FROM msg
                GROUP BY msg.message_id) c) x,
         (SELECT array_agg(ROW(c.k, c.user_id, c.chat_id, c.seq, c.at)::pigeon_ack_step) AS steps
          FROM (SELECT msg.k, msg.user_id, msg.chat_id, max(msg.seq) AS seq, min(msg.at) AS at
                FROM msg GROUP BY msg.k, msg.user_id, msg.chat_id) c) y;
    IF v_ids IS NULL THEN
        RETURN;  -- receipts and other payload entries only
    END IF;

    -- The delivered marks: per user and chat, an ack that goes past the marks before it (the
    -- stored one, the batch's earlier acks) moves it, and owes one receipt per sender (still a
    -- member) of the messages it passes, to each of their devices; all_seq: the lowest
    -- delivered mark of the members but that sender, as of that ack (the acker's is now its
    -- seq), from every member's mark at each step of the chat. A device's receipts take its
    -- next iseqs in batch order, then by chat. The writes are made only if the locks cover what
    -- the plan found; if not, nothing is written and the batch runs again.
    WITH st AS (
        SELECT * FROM unnest(v_steps)
    ), mv AS (
        SELECT st.k, st.user_id, st.chat_id, st.seq, st.at,
               greatest(me.delivered_seq, max(st.seq) OVER (
                   PARTITION BY st.user_id, st.chat_id ORDER BY st.k
                   ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)) AS old
        FROM st JOIN members me ON me.chat_id = st.chat_id AND me.user_id = st.user_id
    ), moving AS (
        SELECT mv.* FROM mv WHERE mv.seq > mv.old
    ), owed AS (  -- each moving ack with each sender it owes a receipt (or one row, none)
        SELECT mo.*, w.writer
        FROM moving mo
        LEFT JOIN LATERAL (
            SELECT v.writer FROM (
                SELECT DISTINCT x.sender AS writer FROM messages x
                WHERE x.chat_id = mo.chat_id AND x.seq > mo.old AND x.seq <= mo.seq
                  AND x.sender <> mo.user_id
            ) v
            WHERE EXISTS (
                SELECT 1 FROM members wm WHERE wm.chat_id = mo.chat_id AND wm.user_id = v.writer)
        ) w ON true
    ), grid AS (  -- with every member's mark as that ack leaves it (the moving acks suffice)
        SELECT ow.k, ow.user_id, ow.chat_id, ow.seq, ow.at, ow.writer, o.user_id AS member,
               greatest(o.delivered_seq,
                        max(CASE WHEN ow.user_id = o.user_id THEN ow.seq END)
                            OVER (PARTITION BY ow.chat_id, o.user_id ORDER BY ow.k)) AS mark
        FROM owed ow JOIN members o ON o.chat_id = ow.chat_id
    ), rd AS (
        SELECT g.k, g.chat_id, g.at, d.id AS device, d.next_iseq AS base,
               pigeon_receipt_json(g.chat_id, g.user_id, 'delivered', g.seq, g.all_seq, g.at)
                   AS payload
        FROM (
            SELECT grid.k, grid.user_id, grid.chat_id, grid.seq, grid.at, grid.writer,
                   least(grid.seq, min(grid.mark) FILTER (
                       WHERE grid.member <> grid.writer AND grid.member <> grid.user_id))
                       AS all_seq
            FROM grid
            WHERE grid.writer IS NOT NULL
            GROUP BY grid.k, grid.user_id, grid.chat_id, grid.seq, grid.at, grid.writer
        ) g
        JOIN devices d ON d.user_id = g.writer
    ), y AS (
        SELECT rd.*,
               rd.base - 1 + row_number() OVER (PARTITION BY rd.device ORDER BY rd.k, rd.chat_id)
                   AS iseq
        FROM rd
    ), ok AS (
        SELECT (SELECT coalesce(bool_and(mo.chat_id = ANY(v_chats)), true) FROM moving mo)
               AND (SELECT coalesce(bool_and(y.device = ANY(v_devices)), true) FROM y)
                   AS covered
    ), mk AS (
        UPDATE members me SET delivered_seq = l.seq
        FROM (SELECT mo.chat_id, mo.user_id, max(mo.seq) AS seq FROM moving mo
              GROUP BY mo.chat_id, mo.user_id) l
        WHERE me.chat_id = l.chat_id AND me.user_id = l.user_id AND (SELECT covered FROM ok)
    ), rl AS (
        INSERT INTO receipt_log (chat_id, user_id, kind, seq, at)
        SELECT mo.chat_id, mo.user_id, 'delivered', mo.seq, mo.at FROM moving mo
        WHERE (SELECT covered FROM ok)
        ON CONFLICT (chat_id, user_id, kind, seq) DO UPDATE SET at = excluded.at
    ), b AS (  -- the counters move past the entries (from where the plan read them)
        UPDATE devices d SET next_iseq = l.last + 1
        FROM (SELECT y.device, min(y.iseq) AS first, max(y.iseq) AS last
              FROM y GROUP BY y.device) l
        WHERE d.id = l.device AND d.next_iseq = l.first AND (SELECT covered FROM ok)
        RETURNING d.id
    ), i AS (
        INSERT INTO inbox (device_id, iseq, message_id, payload, at)
        SELECT y.device, y.iseq, NULL, y.payload, y.at FROM y WHERE (SELECT covered FROM ok)
    )
    SELECT (SELECT covered FROM ok),
           (SELECT count(*) FROM b) = (SELECT count(DISTINCT y.device) FROM y),
           (SELECT array_agg(ROW(y.k, y.device, y.iseq, NULL, y.payload, y.at)::pigeon_entry
                             ORDER BY y.k, y.chat_id, y.device)
            FROM y)
    INTO v_covered, v_complete, v_entries;
    IF NOT v_covered THEN  -- an entry or a member committed since the snapshot read: run again
        RAISE EXCEPTION 'ack found a chat or device it did not lock; retry'
            USING ERRCODE = 'serialization_failure';
    END IF;
    IF NOT v_complete THEN
        RAISE EXCEPTION 'ack lost a receipt device; retry'
            USING ERRCODE = 'serialization_failure';
    END IF;
    RETURN QUERY SELECT en.k, en.device, en.iseq, en.payload FROM unnest(v_entries) en;

    -- Release the bodies for the whole batch: the messages locked once, sorted.
    PERFORM 1 FROM messages m WHERE m.id = ANY(v_ids) ORDER BY m.id FOR NO KEY UPDATE;
    UPDATE messages m SET
        pending = m.pending - c.n,
        raw = CASE WHEN m.pending - c.n <= 0 THEN NULL ELSE m.raw END,
        preview = CASE WHEN m.pending - c.n <= 0 THEN NULL ELSE m.preview END
    FROM unnest(v_ids, v_counts) AS c(id, n)
    WHERE m.id = c.id;
END $$;
"""
