"""Server-side functions of the message path, installed by migration 2.

Why PL/pgSQL: a send must check membership, take the chat's next `seq`, take one `iseq` per
recipient device, store the message and its inbox entries, and move the sender's marks, all in one
transaction. From the client that is a dozen statements, i.e. a dozen network round trips while
the chat row is locked. As one function call it is a single round trip (autocommit: no BEGIN or
COMMIT either), and the chat row is held only for the time the server needs. `ack` and
`mark_read` are built the same way.

Lock order (what makes concurrent writers on many nodes deadlock-free): every transaction takes
row locks in the order chats (by id) -> devices (by id) -> messages (by id), and never waits for a
lock of an earlier kind once it holds one of a later kind. Members' marks and the receipt log are
only written under their chat's lock; inbox rows are only inserted under their device's lock.
Devices are locked with one `ORDER BY id FOR NO KEY UPDATE` (the lock step runs after the sort),
so two transactions that share devices always lock them in the same order. An `ack` finds out
which chats and devices it needs with a snapshot read first and locks them before writing; in the
rare case that what it finds after locking needs a lock it did not take (an entry committed in
between, a member changed), it raises `serialization_failure` and the client retries it.

Gap-free counters: a chat's `last_seq` and a device's `next_iseq` are incremented by UPDATE under
the row lock inside the transaction that uses the number, so a rollback gives the number back and
the next writer waits for the commit. A device's `iseq` is taken while its chat's row is locked
(by `send`), so within one chat the device's inbox order is the chat's `seq` order.

Event encoding: receipts and read states are built here, byte for byte as msgspec encodes them
(`pigeon.domain.events`; tests/contract/test_postgres_store.py compares them), since they are
decided inside the transaction. A message's JSON is encoded by the caller around a `seq`
placeholder (`head` || seq || `tail`), so its body is encoded once, by Python.
"""

from __future__ import annotations

V2 = r"""
CREATE FUNCTION pigeon_receipt_json(
    p_chat text, p_user text, p_kind text, p_seq bigint, p_all bigint, p_at bigint
) RETURNS bytea LANGUAGE sql STABLE AS $$
    SELECT convert_to(format(
        '{"type":"receipt","chat":%s,"user":%s,"kind":"%s","seq":%s,"all_seq":%s,"at":%s}',
        to_json(p_chat), to_json(p_user), p_kind, p_seq, p_all, p_at), 'UTF8')
$$;

CREATE FUNCTION pigeon_read_state_json(p_chat text, p_seq bigint, p_at bigint)
RETURNS bytea LANGUAGE sql STABLE AS $$
    SELECT convert_to(format('{"type":"read_state","chat":%s,"seq":%s,"at":%s}',
        to_json(p_chat), p_seq, p_at), 'UTF8')
$$;

-- Append one entry to each device's inbox: entry k goes to p_devices[k] with p_payloads[k]
-- (NULL when shorter: a message entry, whose body lives in `messages`). Takes each device's
-- next iseq. Returns the entries written, by device id.
CREATE FUNCTION pigeon_append(
    p_devices text[], p_payloads bytea[], p_message text, p_at bigint
) RETURNS TABLE (o_device text, o_iseq bigint, o_payload bytea) LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(cardinality(p_devices), 0) = 0 THEN
        RETURN;
    END IF;
    IF cardinality(p_devices) > 1 THEN
        PERFORM 1 FROM devices d WHERE d.id = ANY(p_devices) ORDER BY d.id FOR NO KEY UPDATE;
    END IF;
    RETURN QUERY
    WITH t AS (
        SELECT u.device, u.payload FROM unnest(p_devices, p_payloads) AS u(device, payload)
    ), b AS (
        UPDATE devices d SET next_iseq = d.next_iseq + 1 FROM t WHERE d.id = t.device
        RETURNING d.id, d.next_iseq - 1 AS iseq, t.payload
    ), i AS (
        INSERT INTO inbox (device_id, iseq, message_id, payload, at)
        SELECT b.id, b.iseq, p_message, b.payload, p_at FROM b
    )
    SELECT b.id, b.iseq, b.payload FROM b ORDER BY b.id;
END $$;

-- `counts[k]` inbox entries of message `ids[k]` are gone: a message nobody awaits any more
-- loses its body and its chat-list preview.
CREATE FUNCTION pigeon_release(p_ids text[], p_counts integer[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(cardinality(p_ids), 0) = 0 THEN
        RETURN;
    END IF;
    IF cardinality(p_ids) > 1 THEN
        PERFORM 1 FROM messages m WHERE m.id = ANY(p_ids) ORDER BY m.id FOR NO KEY UPDATE;
    END IF;
    UPDATE messages m SET
        pending = m.pending - c.n,
        raw = CASE WHEN m.pending - c.n <= 0 THEN NULL ELSE m.raw END,
        preview = CASE WHEN m.pending - c.n <= 0 THEN NULL ELSE m.preview END
    FROM unnest(p_ids, p_counts) AS c(id, n)
    WHERE m.id = c.id;
END $$;

-- Move the user's delivered (or read) mark in the chat up to p_seq and write receipts to the
-- devices of the senders of the messages it passes. Never moves a mark backwards. The caller
-- holds the chat's lock and has locked the senders' devices.
CREATE FUNCTION pigeon_advance(
    p_chat text, p_user text, p_kind text, p_seq bigint, p_at bigint
) RETURNS TABLE (o_device text, o_iseq bigint, o_payload bytea) LANGUAGE plpgsql AS $$
DECLARE
    v_delivered bigint;
    v_read bigint;
    v_old bigint;
    v_devices text[];
    v_payloads bytea[];
BEGIN
    SELECT m.delivered_seq, m.read_seq INTO v_delivered, v_read
    FROM members m WHERE m.chat_id = p_chat AND m.user_id = p_user;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    v_old := CASE WHEN p_kind = 'delivered' THEN v_delivered ELSE v_read END;
    IF p_seq <= v_old THEN
        RETURN;
    END IF;
    UPDATE members m SET
        delivered_seq = greatest(v_delivered, p_seq),
        read_seq = CASE WHEN p_kind = 'read' THEN p_seq ELSE v_read END
    WHERE m.chat_id = p_chat AND m.user_id = p_user;
    INSERT INTO receipt_log (chat_id, user_id, kind, seq, at)
    VALUES (p_chat, p_user, p_kind, p_seq, p_at)
    ON CONFLICT (chat_id, user_id, kind, seq) DO UPDATE SET at = excluded.at;
    -- one receipt per sender still in the chat; all_seq: the lowest mark of the others
    SELECT array_agg(d.id ORDER BY d.id),
           array_agg(pigeon_receipt_json(p_chat, p_user, p_kind, p_seq, r.all_seq, p_at)
                     ORDER BY d.id)
    INTO v_devices, v_payloads
    FROM (
        SELECT s.sender, (
            SELECT coalesce(min(CASE WHEN p_kind = 'delivered' THEN o.delivered_seq
                                     ELSE o.read_seq END), p_seq)
            FROM members o WHERE o.chat_id = p_chat AND o.user_id <> s.sender
        ) AS all_seq
        FROM (
            SELECT DISTINCT x.sender FROM messages x
            WHERE x.chat_id = p_chat AND x.seq > v_old AND x.seq <= p_seq
              AND x.sender <> p_user
        ) s
        WHERE EXISTS (
            SELECT 1 FROM members sm WHERE sm.chat_id = p_chat AND sm.user_id = s.sender
        )
    ) r
    JOIN devices d ON d.user_id = r.sender;
    RETURN QUERY SELECT * FROM pigeon_append(v_devices, v_payloads, NULL, p_at);
END $$;

-- MessageStore.send. o_status: 0 sent, 1 duplicate (o_dup_* and o_seq describe the original),
-- 2 no such chat, 3 not a participant. pigeon_append is inlined (a nested call costs more than
-- the statements it runs).
CREATE FUNCTION pigeon_send(
    p_id text, p_chat text, p_sender text, p_device text, p_cmid text, p_at bigint,
    p_head bytea, p_tail bytea, p_preview text,
    OUT o_status integer, OUT o_seq bigint,
    OUT o_devices text[], OUT o_iseqs bigint[],
    OUT o_extra_devices text[], OUT o_extra_iseqs bigint[], OUT o_extra_payloads bytea[],
    OUT o_dup_id text, OUT o_dup_chat text, OUT o_dup_at bigint, OUT o_dup_raw bytea
) LANGUAGE plpgsql AS $$
DECLARE
    v_member boolean;
    v_read bigint;
    v_targets text[];
    v_count integer;
BEGIN
    SELECT m.id, m.chat_id, m.seq, m.at, m.raw
    INTO o_dup_id, o_dup_chat, o_seq, o_dup_at, o_dup_raw
    FROM messages m WHERE m.sender_device = p_device AND m.cmid = p_cmid;
    IF FOUND THEN
        o_status := 1;
        RETURN;
    END IF;
    PERFORM 1 FROM chats c WHERE c.id = p_chat FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        o_status := 2;
        RETURN;
    END IF;
    -- after the lock: membership as of the last change committed before us. The members'
    -- devices by one probe of devices_by_user per member (a join may hash a scan of devices).
    SELECT coalesce(bool_or(m.user_id = p_sender), false),
           max(m.read_seq) FILTER (WHERE m.user_id = p_sender),
           ARRAY(SELECT d.id FROM devices d
                 WHERE d.user_id = ANY(array_agg(m.user_id)) AND d.id <> p_device
                 ORDER BY d.id)
    INTO v_member, v_read, v_targets
    FROM members m
    WHERE m.chat_id = p_chat;
    IF NOT v_member THEN
        o_status := 3;
        RETURN;
    END IF;
    UPDATE chats c SET last_seq = c.last_seq + 1, last_activity_at = p_at, last_sender = p_sender
    WHERE c.id = p_chat RETURNING c.last_seq INTO o_seq;
    v_count := cardinality(v_targets);
    IF v_count > 0 THEN
        IF v_count > 1 THEN
            PERFORM 1 FROM devices d WHERE d.id = ANY(v_targets) ORDER BY d.id FOR NO KEY UPDATE;
        END IF;
        WITH b AS (
            UPDATE devices d SET next_iseq = d.next_iseq + 1 WHERE d.id = ANY(v_targets)
            RETURNING d.id, d.next_iseq - 1 AS iseq
        ), i AS (
            INSERT INTO inbox (device_id, iseq, message_id, payload, at)
            SELECT b.id, b.iseq, p_id, NULL, p_at FROM b
        )
        SELECT array_agg(b.id ORDER BY b.id), array_agg(b.iseq ORDER BY b.id)
        INTO o_devices, o_iseqs
        FROM b;
        v_count := coalesce(cardinality(o_devices), 0);
    END IF;
    INSERT INTO messages (id, chat_id, seq, sender, sender_device, cmid, at, raw, preview, pending)
    VALUES (p_id, p_chat, o_seq, p_sender, p_device, p_cmid, p_at,
            CASE WHEN v_count > 0 THEN p_head || convert_to(o_seq::text, 'UTF8') || p_tail END,
            p_preview, v_count);
    -- The sender has read everything up to their own message. If that passes messages of
    -- others (a quick reply before the ack), their senders get the read receipts they are owed;
    -- otherwise moving the marks is all there is to do.
    IF v_read < o_seq - 1 THEN
        SELECT array_agg(a.o_device), array_agg(a.o_iseq), array_agg(a.o_payload)
        INTO o_extra_devices, o_extra_iseqs, o_extra_payloads
        FROM pigeon_advance(p_chat, p_sender, 'read', o_seq, p_at) a;
    ELSE
        UPDATE members m SET delivered_seq = o_seq, read_seq = o_seq
        WHERE m.chat_id = p_chat AND m.user_id = p_sender;
    END IF;
    o_status := 0;
END $$;

-- MessageStore.ack: drop the device's entries up to p_upto, advance the user's delivered marks,
-- write receipts, release bodies. See the lock order above. pigeon_advance ('delivered'),
-- pigeon_append and pigeon_release are inlined here: this runs twice per message (the
-- recipient's ack, then the sender's ack of the receipt).
CREATE FUNCTION pigeon_ack(p_device text, p_upto bigint, p_at bigint)
RETURNS TABLE (o_device text, o_iseq bigint, o_payload bytea) LANGUAGE plpgsql AS $$
DECLARE
    v_user text;
    v_acked bigint;
    v_next bigint;
    v_chats text[];
    v_devices text[];
    v_ids text[];
    v_counts integer[];
    v_mchats text[];
    v_mseqs bigint[];
    v_chat text;
    v_seq bigint;
    v_delivered bigint;
    v_rdevices text[];
    v_payloads bytea[];
BEGIN
    SELECT d.user_id, d.acked_iseq INTO v_user, v_acked FROM devices d WHERE d.id = p_device;
    IF NOT FOUND OR p_upto <= v_acked THEN
        RETURN;
    END IF;
    -- Snapshot read, no locks yet: the chats whose delivered mark moves, and the devices of the
    -- senders who get a receipt.
    WITH reached AS (
        SELECT m.chat_id, max(m.seq) AS seq
        FROM inbox i JOIN messages m ON m.id = i.message_id
        WHERE i.device_id = p_device AND i.iseq <= p_upto
        GROUP BY m.chat_id
    ), moving AS (
        SELECT r.chat_id, r.seq, me.delivered_seq AS old
        FROM reached r
        JOIN members me ON me.chat_id = r.chat_id AND me.user_id = v_user
        WHERE r.seq > me.delivered_seq
    )
    SELECT (SELECT array_agg(mv.chat_id ORDER BY mv.chat_id) FROM moving mv),
           (SELECT array_agg(DISTINCT d.id)
            FROM moving mv
            JOIN messages x ON x.chat_id = mv.chat_id AND x.seq > mv.old AND x.seq <= mv.seq
            JOIN devices d ON d.user_id = x.sender
            WHERE x.sender <> v_user)
    INTO v_chats, v_devices;
    v_chats := coalesce(v_chats, '{}');
    IF cardinality(v_chats) > 0 THEN
        PERFORM 1 FROM chats c WHERE c.id = ANY(v_chats) ORDER BY c.id FOR NO KEY UPDATE;
    END IF;
    -- Lock the devices (sorted; the subquery is not flattened, so all of them are locked) and
    -- read the acking one's counters as of the lock.
    SELECT max(x.acked_iseq) FILTER (WHERE x.id = p_device),
           max(x.next_iseq) FILTER (WHERE x.id = p_device)
    INTO v_acked, v_next
    FROM (
        SELECT d.id, d.acked_iseq, d.next_iseq FROM devices d
        WHERE d.id = ANY(array_append(v_devices, p_device)) ORDER BY d.id FOR NO KEY UPDATE
    ) x;
    IF v_next IS NULL OR p_upto <= v_acked THEN
        RETURN;  -- revoked meanwhile, or a concurrent ack of the same range did it
    END IF;
    -- Drop the entries, move the ack, and collect the messages released (with their counts)
    -- and the highest seq reached per chat.
    WITH gone AS (
        DELETE FROM inbox i WHERE i.device_id = p_device AND i.iseq <= p_upto
        RETURNING i.message_id
    ), moved AS (
        UPDATE devices d SET acked_iseq = least(p_upto, v_next - 1) WHERE d.id = p_device
    ), g AS (
        SELECT gone.message_id, count(*)::integer AS n FROM gone
        WHERE gone.message_id IS NOT NULL GROUP BY gone.message_id
    ), c AS (
        SELECT m.chat_id, max(m.seq) AS seq FROM g JOIN messages m ON m.id = g.message_id
        GROUP BY m.chat_id
    )
    -- (v_ids unsorted: the release below locks them sorted)
    SELECT x.ids, x.counts, y.chats, y.seqs
    INTO v_ids, v_counts, v_mchats, v_mseqs
    FROM (SELECT array_agg(g.message_id) AS ids, array_agg(g.n) AS counts FROM g) x,
         (SELECT array_agg(c.chat_id ORDER BY c.chat_id) AS chats,
                 array_agg(c.seq ORDER BY c.chat_id) AS seqs FROM c) y;
    IF v_ids IS NULL THEN
        RETURN;  -- receipts and other payload entries only
    END IF;
    FOR k IN 1 .. coalesce(cardinality(v_mchats), 0) LOOP
        v_chat := v_mchats[k];
        v_seq := v_mseqs[k];
        -- pigeon_advance(v_chat, v_user, 'delivered', v_seq, p_at), inlined
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
        VALUES (v_chat, v_user, 'delivered', v_seq, p_at)
        ON CONFLICT (chat_id, user_id, kind, seq) DO UPDATE SET at = excluded.at;
        -- one receipt per sender still in the chat; all_seq: the lowest mark of the others
        SELECT array_agg(d.id ORDER BY d.id),
               array_agg(pigeon_receipt_json(v_chat, v_user, 'delivered', v_seq, r.all_seq, p_at)
                         ORDER BY d.id)
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
        -- pigeon_append(v_rdevices, v_payloads, NULL, p_at), inlined
        IF cardinality(v_rdevices) = 1 THEN
            RETURN QUERY
            WITH b AS (
                UPDATE devices d SET next_iseq = d.next_iseq + 1 WHERE d.id = v_rdevices[1]
                RETURNING d.id, d.next_iseq - 1 AS iseq
            ), i AS (
                INSERT INTO inbox (device_id, iseq, message_id, payload, at)
                SELECT b.id, b.iseq, NULL, v_payloads[1], p_at FROM b
            )
            SELECT b.id, b.iseq, v_payloads[1] FROM b;
        ELSE
            PERFORM 1 FROM devices d WHERE d.id = ANY(v_rdevices) ORDER BY d.id
            FOR NO KEY UPDATE;
            RETURN QUERY
            WITH t AS (
                SELECT u.device, u.payload FROM unnest(v_rdevices, v_payloads) AS u(device, payload)
            ), b AS (
                UPDATE devices d SET next_iseq = d.next_iseq + 1 FROM t WHERE d.id = t.device
                RETURNING d.id, d.next_iseq - 1 AS iseq, t.payload
            ), i AS (
                INSERT INTO inbox (device_id, iseq, message_id, payload, at)
                SELECT b.id, b.iseq, NULL, b.payload, p_at FROM b
            )
            SELECT b.id, b.iseq, b.payload FROM b ORDER BY b.id;
        END IF;
    END LOOP;
    -- pigeon_release(v_ids, v_counts), inlined
    IF cardinality(v_ids) > 1 THEN
        PERFORM 1 FROM messages m WHERE m.id = ANY(v_ids) ORDER BY m.id FOR NO KEY UPDATE;
    END IF;
    UPDATE messages m SET
        pending = m.pending - c.n,
        raw = CASE WHEN m.pending - c.n <= 0 THEN NULL ELSE m.raw END,
        preview = CASE WHEN m.pending - c.n <= 0 THEN NULL ELSE m.preview END
    FROM unnest(v_ids, v_counts) AS c(id, n)
    WHERE m.id = c.id;
END $$;

-- MessageStore.mark_read. o_status: 0 done (possibly nothing to do), 2 no such chat,
-- 3 not a participant.
CREATE FUNCTION pigeon_mark_read(
    p_device text, p_user text, p_chat text, p_seq bigint, p_at bigint,
    OUT o_status integer, OUT o_devices text[], OUT o_iseqs bigint[], OUT o_payloads bytea[]
) LANGUAGE plpgsql AS $$
DECLARE
    v_last bigint;
    v_read bigint;
    v_upto bigint;
    v_others text[];
    v_senders text[];
    v_state bytea;
BEGIN
    SELECT c.last_seq INTO v_last FROM chats c WHERE c.id = p_chat FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        o_status := 2;
        RETURN;
    END IF;
    SELECT m.read_seq INTO v_read FROM members m
    WHERE m.chat_id = p_chat AND m.user_id = p_user;
    IF NOT FOUND THEN
        o_status := 3;
        RETURN;
    END IF;
    o_status := 0;
    v_upto := least(p_seq, v_last);
    IF v_upto <= v_read THEN
        RETURN;
    END IF;
    SELECT array_agg(d.id ORDER BY d.id) INTO v_others
    FROM devices d WHERE d.user_id = p_user AND d.id <> p_device;
    SELECT array_agg(d.id) INTO v_senders
    FROM devices d WHERE d.user_id IN (
        SELECT x.sender FROM messages x
        WHERE x.chat_id = p_chat AND x.seq > v_read AND x.seq <= v_upto AND x.sender <> p_user
    );
    PERFORM 1 FROM devices d WHERE d.id = ANY(v_others || v_senders)
    ORDER BY d.id FOR NO KEY UPDATE;
    v_state := pigeon_read_state_json(p_chat, v_upto, p_at);
    SELECT array_agg(a.o_device), array_agg(a.o_iseq), array_agg(a.o_payload)
    INTO o_devices, o_iseqs, o_payloads
    FROM (
        SELECT * FROM pigeon_advance(p_chat, p_user, 'read', v_upto, p_at)
        UNION ALL
        SELECT * FROM pigeon_append(
            v_others, array_fill(v_state, ARRAY[coalesce(cardinality(v_others), 0)]), NULL, p_at)
    ) a;
END $$;

-- AccountStore.revoke_device: the device, its token and its inbox go; bodies nobody awaits
-- any more are released.
CREATE FUNCTION pigeon_revoke(p_user text, p_device text) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_ids text[];
    v_counts integer[];
BEGIN
    DELETE FROM devices d WHERE d.id = p_device AND d.user_id = p_user;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    WITH gone AS (
        DELETE FROM inbox i WHERE i.device_id = p_device RETURNING i.message_id
    )
    SELECT array_agg(g.message_id ORDER BY g.message_id), array_agg(g.n ORDER BY g.message_id)
    INTO v_ids, v_counts
    FROM (
        SELECT gone.message_id, count(*)::integer AS n FROM gone
        WHERE gone.message_id IS NOT NULL GROUP BY gone.message_id
    ) g;
    PERFORM pigeon_release(v_ids, v_counts);
    RETURN true;
END $$;
"""
