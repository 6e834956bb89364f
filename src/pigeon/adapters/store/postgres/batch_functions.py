"""Server-side functions of the batched message path, installed by migration 6.

`pigeon_send_batch` and `pigeon_ack_batch` do what `pigeon_send` and `pigeon_ack` (functions.py)
do, for many calls in one transaction: a node's concurrent sends (and acks) share one network
round trip, one function call and one commit (group commit, see `batching.py`). Under load the
call and the commit were most of a message's PostgreSQL time; a batch of one costs about what the
single-call functions cost, so they are used for every call (and the single-call functions,
which nodes of the previous version call during a rolling upgrade, become batches of one).

Lock order is the one of functions.py (chats by id -> devices by id -> messages by id), kept for
the batch as a whole: every lock of a kind is taken, sorted, before any lock of a later kind.
- `pigeon_send_batch` locks the chats of all its sends, then every device a send may write (its
  chat's members' devices but the sending one: known once the chats are locked, since
  membership changes take the chat's lock), then runs the sends in order. Messages are only
  inserted.
- `pigeon_ack_batch` reads its plan for all acks without locks (chats whose delivered mark moves,
  devices that get a receipt), locks them, runs each ack, and releases the bodies of all of them
  at the end, locking those messages once, sorted. If an ack finds it needs a chat it did not lock
  (an entry committed in between), it raises `serialization_failure`; the batch is run again.

Each element's outcome comes back with its position `o_k` (1-based) in the arrays passed.
"""

from __future__ import annotations

V6 = r"""
CREATE FUNCTION pigeon_send_batch(
    p_ids text[], p_chats text[], p_senders text[], p_devices text[], p_cmids text[],
    p_ats bigint[], p_heads bytea[], p_tails bytea[], p_previews text[]
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
            v_count := coalesce(cardinality(o_devices), 0);
        END IF;
        INSERT INTO messages
            (id, chat_id, seq, sender, sender_device, cmid, at, raw, preview, pending)
        VALUES (p_ids[k], p_chats[k], o_seq, p_senders[k], p_devices[k], p_cmids[k], p_ats[k],
                CASE WHEN v_count > 0
                     THEN p_heads[k] || convert_to(o_seq::text, 'UTF8') || p_tails[k] END,
                p_previews[k], v_count);
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

CREATE FUNCTION pigeon_ack_batch(p_devices text[], p_uptos bigint[], p_ats bigint[])
RETURNS TABLE (o_k integer, o_device text, o_iseq bigint, o_payload bytea)
LANGUAGE plpgsql AS $$
DECLARE
    k integer;
    j integer;
    v_user text;
    v_acked bigint;
    v_next bigint;
    v_at bigint;
    v_chats text[];
    v_devices text[];
    v_ids text[] := '{}';
    v_counts integer[] := '{}';
    v_kids text[];
    v_kcounts integer[];
    v_mchats text[];
    v_mseqs bigint[];
    v_chat text;
    v_seq bigint;
    v_delivered bigint;
    v_rdevices text[];
    v_payloads bytea[];
BEGIN
    -- Snapshot read, no locks yet: the chats whose delivered marks move, and the devices of the
    -- senders who get a receipt, for all the acks.
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
    FOR k IN 1 .. cardinality(p_devices) LOOP
        v_at := p_ats[k];
        -- counters as of the lock (held: a plain read sees the last committed version)
        SELECT d.user_id, d.acked_iseq, d.next_iseq INTO v_user, v_acked, v_next
        FROM devices d WHERE d.id = p_devices[k];
        -- revoked meanwhile, or an earlier ack (of the batch, or committed) did it
        CONTINUE WHEN NOT FOUND OR p_uptos[k] <= v_acked;
        WITH gone AS (
            DELETE FROM inbox i WHERE i.device_id = p_devices[k] AND i.iseq <= p_uptos[k]
            RETURNING i.message_id
        ), moved AS (
            UPDATE devices d SET acked_iseq = least(p_uptos[k], v_next - 1)
            WHERE d.id = p_devices[k]
        ), g AS (
            SELECT gone.message_id, count(*)::integer AS n FROM gone
            WHERE gone.message_id IS NOT NULL GROUP BY gone.message_id
        ), c AS (
            SELECT m.chat_id, max(m.seq) AS seq FROM g JOIN messages m ON m.id = g.message_id
            GROUP BY m.chat_id
        )
        SELECT x.ids, x.counts, y.chats, y.seqs
        INTO v_kids, v_kcounts, v_mchats, v_mseqs
        FROM (SELECT array_agg(g.message_id) AS ids, array_agg(g.n) AS counts FROM g) x,
             (SELECT array_agg(c.chat_id ORDER BY c.chat_id) AS chats,
                     array_agg(c.seq ORDER BY c.chat_id) AS seqs FROM c) y;
        CONTINUE WHEN v_kids IS NULL;  -- receipts and other payload entries only
        v_ids := v_ids || v_kids;
        v_counts := v_counts || v_kcounts;
        FOR j IN 1 .. coalesce(cardinality(v_mchats), 0) LOOP
            v_chat := v_mchats[j];
            v_seq := v_mseqs[j];
            -- pigeon_advance(v_chat, v_user, 'delivered', v_seq, v_at), inlined
            SELECT me.delivered_seq INTO v_delivered
            FROM members me WHERE me.chat_id = v_chat AND me.user_id = v_user;
            CONTINUE WHEN NOT FOUND OR v_seq <= v_delivered;
            IF NOT v_chat = ANY(v_chats) THEN
                RAISE EXCEPTION 'ack found a chat it did not lock; retry'
                    USING ERRCODE = 'serialization_failure';
            END IF;
            UPDATE members me SET delivered_seq = v_seq
            WHERE me.chat_id = v_chat AND me.user_id = v_user;
            INSERT INTO receipt_log (chat_id, user_id, kind, seq, at)
            VALUES (v_chat, v_user, 'delivered', v_seq, v_at)
            ON CONFLICT (chat_id, user_id, kind, seq) DO UPDATE SET at = excluded.at;
            SELECT array_agg(d.id ORDER BY d.id),
                   array_agg(pigeon_receipt_json(v_chat, v_user, 'delivered', v_seq, r.all_seq,
                                                 v_at) ORDER BY d.id)
            INTO v_rdevices, v_payloads
            FROM (
                SELECT s.sender, (
                    SELECT coalesce(min(o.delivered_seq), v_seq)
                    FROM members o WHERE o.chat_id = v_chat AND o.user_id <> s.sender
                ) AS all_seq
                FROM (
                    SELECT DISTINCT x.sender FROM messages x
                    WHERE x.chat_id = v_chat AND x.seq > v_delivered AND x.seq <= v_seq
                      AND x.sender <> v_user
                ) s
                WHERE EXISTS (
                    SELECT 1 FROM members sm WHERE sm.chat_id = v_chat AND sm.user_id = s.sender
                )
            ) r
            JOIN devices d ON d.user_id = r.sender;
            CONTINUE WHEN v_rdevices IS NULL;
            IF NOT v_rdevices <@ v_devices THEN
                RAISE EXCEPTION 'ack found a device it did not lock; retry'
                    USING ERRCODE = 'serialization_failure';
            END IF;
            IF cardinality(v_rdevices) = 1 THEN  -- a 1:1 chat: the common case, by key
                RETURN QUERY
                WITH b AS (
                    UPDATE devices d SET next_iseq = d.next_iseq + 1 WHERE d.id = v_rdevices[1]
                    RETURNING d.id, d.next_iseq - 1 AS iseq
                ), i AS (
                    INSERT INTO inbox (device_id, iseq, message_id, payload, at)
                    SELECT b.id, b.iseq, NULL, v_payloads[1], v_at FROM b
                )
                SELECT k, b.id, b.iseq, v_payloads[1] FROM b;
                CONTINUE;
            END IF;
            RETURN QUERY
            WITH b AS (
                UPDATE devices d SET next_iseq = d.next_iseq + 1 WHERE d.id = ANY(v_rdevices)
                RETURNING d.id, d.next_iseq - 1 AS iseq
            ), t AS (
                SELECT b.id, b.iseq, u.payload
                FROM b JOIN unnest(v_rdevices, v_payloads) AS u(device, payload)
                     ON u.device = b.id
            ), i AS (
                INSERT INTO inbox (device_id, iseq, message_id, payload, at)
                SELECT t.id, t.iseq, NULL, t.payload, v_at FROM t
            )
            SELECT k, t.id, t.iseq, t.payload FROM t ORDER BY t.id;
        END LOOP;
    END LOOP;
    -- pigeon_release for the whole batch: the messages locked once, sorted
    IF cardinality(v_ids) > 0 THEN
        PERFORM 1 FROM messages m WHERE m.id = ANY(v_ids) ORDER BY m.id FOR NO KEY UPDATE;
        UPDATE messages m SET
            pending = m.pending - c.n,
            raw = CASE WHEN m.pending - c.n <= 0 THEN NULL ELSE m.raw END,
            preview = CASE WHEN m.pending - c.n <= 0 THEN NULL ELSE m.preview END
        FROM (
            SELECT u.id, sum(u.n)::integer AS n FROM unnest(v_ids, v_counts) AS u(id, n)
            GROUP BY u.id
        ) c
        WHERE m.id = c.id;
    END IF;
END $$;

-- The single-call functions of migration 2, for nodes of the previous version during a rolling
-- upgrade, become batches of one: one implementation of the rules stays live.
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
                           ARRAY[p_preview]) b
$$;

CREATE OR REPLACE FUNCTION pigeon_ack(p_device text, p_upto bigint, p_at bigint)
RETURNS TABLE (o_device text, o_iseq bigint, o_payload bytea) LANGUAGE sql AS $$
    SELECT b.o_device, b.o_iseq, b.o_payload
    FROM pigeon_ack_batch(ARRAY[p_device], ARRAY[p_upto], ARRAY[p_at]) b
$$;
"""
