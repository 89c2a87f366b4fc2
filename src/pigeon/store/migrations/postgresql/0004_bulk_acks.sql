-- Acks in bulk: `pigeon_ack` applies a batch of device acks (many sockets of one process)
-- in ONE statement, i.e. one round trip and one short transaction, instead of 6-8 round
-- trips per ack. Same records as acking one by one (see pigeon.store.receipts):
--
-- * each device's cursor moves to min(its highest ack of the batch, its user's inbox
--   head), never back; revoked or unknown devices are left out of the answer;
-- * each member's delivered_seq moves to the highest message acked in the moved cursor
--   ranges of the user's devices, never back; a user who left the conversation since
--   records nothing there;
-- * conversations of at most p_detail_max members: each sender (other than the member,
--   still a member, of a user message in the member's moved range) gets one receipt entry
--   per member that moved, with the member's new positions and the aggregate after the
--   batch;
-- * bigger ones: only if the aggregate (min over members) moved, one entry per sender of
--   a user message in the aggregate's moved ranges, with user_id 0 (AGGREGATE_USER).
--
-- Locks, in the store's global order: devices (id order), then a transaction advisory lock
-- per big conversation (key order: the aggregate before/after is read under it, so two
-- concurrent batches cannot both miss its move), then members rows ((conv_id, user_id)
-- order), then users rows (id order) for the receipt entries' inbox positions.
--
-- Returns one row per device found (out_device, out_moved) and one row per receipt entry
-- written (out_user .. out_all_read), entries in the order they were appended.

CREATE OR REPLACE FUNCTION pigeon_ack(
    p_devices bigint[],
    p_up_to bigint[],
    p_detail_max integer,
    p_now double precision,
    p_ts_json text  -- p_now as JSON, formatted by the caller (stored receipts match Python's)
) RETURNS TABLE (
    out_device bigint,
    out_moved boolean,
    out_user bigint,
    out_inbox_seq bigint,
    out_conv bigint,
    out_member bigint,
    out_delivered bigint,
    out_read bigint,
    out_all_delivered bigint,
    out_all_read bigint
) LANGUAGE plpgsql AS $fn$
DECLARE
    v_dev bigint[];  v_dev_user bigint[];  v_old bigint[];  v_new bigint[];
    v_a_conv bigint[];  v_a_user bigint[];  v_a_seq bigint[];
    v_big bigint[];
    v_b_conv bigint[];  v_b_del bigint[];  v_b_read bigint[];
    v_m_conv bigint[];  v_m_user bigint[];  v_m_old bigint[];  v_m_new bigint[];  v_m_read bigint[];
    v_g_conv bigint[];  v_g_del bigint[];  v_g_read bigint[];
    v_e_user bigint[];  v_e_conv bigint[];  v_e_member bigint[];
    v_e_del bigint[];  v_e_read bigint[];  v_e_all_del bigint[];  v_e_all_read bigint[];
BEGIN
    -- 1. Devices, locked in id order; each one's highest ack of the batch, clamped to the
    --    user's inbox head (a concurrent revoke that committed first excludes the device).
    SELECT array_agg(l.id), array_agg(l.user_id), array_agg(l.cursor),
           array_agg(greatest(l.cursor, least(l.up_to, u.inbox_head)))
      INTO v_dev, v_dev_user, v_old, v_new
      FROM (SELECT d.id, d.user_id, d.cursor, r.up_to
              FROM devices d
              JOIN (SELECT a.dev, max(a.up_to) AS up_to
                      FROM unnest(p_devices, p_up_to) AS a(dev, up_to) GROUP BY a.dev) r
                ON d.id = r.dev
             WHERE d.revoked_at IS NULL
             ORDER BY d.id
               FOR NO KEY UPDATE OF d) l
      JOIN users u ON u.id = l.user_id;
    IF v_dev IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY SELECT x.d, x.n > x.o, NULL::bigint, NULL::bigint, NULL::bigint,
                        NULL::bigint, NULL::bigint, NULL::bigint, NULL::bigint, NULL::bigint
                   FROM unnest(v_dev, v_old, v_new) AS x(d, o, n);
    UPDATE devices d SET cursor = x.n
      FROM unnest(v_dev, v_old, v_new) AS x(id, o, n)
     WHERE d.id = x.id AND x.n > x.o;

    -- 2. The highest message acked per (conversation, user): delivered is cumulative, and
    --    the union of a user's devices' moved ranges has the same maximum as each range.
    SELECT array_agg(a.conv_id ORDER BY a.conv_id, a.user_id),
           array_agg(a.user_id ORDER BY a.conv_id, a.user_id),
           array_agg(a.seq ORDER BY a.conv_id, a.user_id)
      INTO v_a_conv, v_a_user, v_a_seq
      FROM (SELECT i.conv_id, x.u AS user_id, max(i.msg_seq) AS seq
              FROM unnest(v_dev_user, v_old, v_new) AS x(u, o, n)
              JOIN inbox i ON i.user_id = x.u AND i.inbox_seq > x.o AND i.inbox_seq <= x.n
             WHERE x.n > x.o AND i.msg_seq IS NOT NULL
             GROUP BY i.conv_id, x.u) a;
    IF v_a_conv IS NULL THEN
        RETURN;
    END IF;

    -- 3. Big conversations (aggregate receipts only): lock each, then read its aggregate.
    SELECT array_agg(c.id ORDER BY c.id) INTO v_big
      FROM (SELECT DISTINCT a.id FROM unnest(v_a_conv) AS a(id)) c
     WHERE (SELECT count(*) FROM (SELECT 1 FROM members m WHERE m.conv_id = c.id
                                   LIMIT p_detail_max + 1) s) > p_detail_max;
    IF v_big IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock(1633905507, k.key)  -- "ackc"
           FROM (SELECT DISTINCT (b.id % 2147483648)::integer AS key
                   FROM unnest(v_big) AS b(id) ORDER BY 1) k;
        SELECT array_agg(b.id),
               array_agg(coalesce((SELECT min(m.delivered_seq) FROM members m
                                    WHERE m.conv_id = b.id), 0)),
               array_agg(coalesce((SELECT min(m.read_seq) FROM members m
                                    WHERE m.conv_id = b.id), 0))
          INTO v_b_conv, v_b_del, v_b_read
          FROM unnest(v_big) AS b(id);
    END IF;

    -- 4. Members' rows, locked in (conv_id, user_id) order; those that move are updated.
    --    A user who left the conversation has no row: nothing is recorded there.
    SELECT array_agg(l.conv_id), array_agg(l.user_id), array_agg(l.delivered_seq),
           array_agg(l.seq), array_agg(l.read_seq)
      INTO v_m_conv, v_m_user, v_m_old, v_m_new, v_m_read
      FROM (SELECT m.conv_id, m.user_id, m.delivered_seq, m.read_seq, a.seq
              FROM members m
              JOIN unnest(v_a_conv, v_a_user, v_a_seq) AS a(conv_id, user_id, seq)
                ON m.conv_id = a.conv_id AND m.user_id = a.user_id
             ORDER BY m.conv_id, m.user_id
               FOR NO KEY UPDATE OF m) l
     WHERE l.seq > l.delivered_seq;
    IF v_m_conv IS NULL THEN
        RETURN;
    END IF;
    UPDATE members m SET delivered_seq = x.n
      FROM unnest(v_m_conv, v_m_user, v_m_new) AS x(c, u, n)
     WHERE m.conv_id = x.c AND m.user_id = x.u;

    -- 5. The aggregates after the update, for every conversation that moved.
    SELECT array_agg(g.id),
           array_agg(coalesce((SELECT min(m.delivered_seq) FROM members m
                                WHERE m.conv_id = g.id), 0)),
           array_agg(coalesce((SELECT min(m.read_seq) FROM members m
                                WHERE m.conv_id = g.id), 0))
      INTO v_g_conv, v_g_del, v_g_read
      FROM (SELECT DISTINCT c.id FROM unnest(v_m_conv) AS c(id)) g;

    -- 6. The receipt entries, in the order they are appended: by conversation, then member
    --    (the aggregate's user 0 in big ones), then recipient.
    WITH agg_after AS (
        SELECT * FROM unnest(v_g_conv, v_g_del, v_g_read) AS g(conv_id, del, rd)
    ), small AS (
        SELECT x.c AS conv_id, x.u AS member, s.sender, x.n AS del, x.r AS rd,
               g.del AS all_del, g.rd AS all_rd
          FROM unnest(v_m_conv, v_m_user, v_m_old, v_m_new, v_m_read) AS x(c, u, o, n, r)
          JOIN agg_after g ON g.conv_id = x.c
         CROSS JOIN LATERAL (
               SELECT DISTINCT msg.sender_id AS sender FROM messages msg
                WHERE msg.conv_id = x.c AND msg.seq > x.o AND msg.seq <= x.n
                  AND msg.sender_id <> x.u AND msg.kind <> 'system'
                  AND EXISTS (SELECT 1 FROM members mm
                               WHERE mm.conv_id = msg.conv_id AND mm.user_id = msg.sender_id)
         ) s
         WHERE v_big IS NULL OR x.c <> ALL (v_big)
    ), big AS (
        SELECT b.conv_id, 0::bigint AS member, s.sender, g.del, g.rd,
               g.del AS all_del, g.rd AS all_rd
          FROM unnest(v_b_conv, v_b_del, v_b_read) AS b(conv_id, del, rd)
          JOIN agg_after g ON g.conv_id = b.conv_id
         CROSS JOIN LATERAL (
               SELECT msg.sender_id AS sender FROM messages msg
                WHERE msg.conv_id = b.conv_id AND msg.seq > b.del AND msg.seq <= g.del
                  AND msg.kind <> 'system'
               UNION
               SELECT msg.sender_id FROM messages msg
                WHERE msg.conv_id = b.conv_id AND msg.seq > b.rd AND msg.seq <= g.rd
                  AND msg.kind <> 'system'
         ) s
         WHERE (g.del, g.rd) <> (b.del, b.rd) AND s.sender <> 0
           AND EXISTS (SELECT 1 FROM members mm
                        WHERE mm.conv_id = b.conv_id AND mm.user_id = s.sender)
    ), entries AS (
        SELECT * FROM small UNION ALL SELECT * FROM big
    )
    SELECT array_agg(e.sender ORDER BY e.conv_id, e.member, e.sender),
           array_agg(e.conv_id ORDER BY e.conv_id, e.member, e.sender),
           array_agg(e.member ORDER BY e.conv_id, e.member, e.sender),
           array_agg(e.del ORDER BY e.conv_id, e.member, e.sender),
           array_agg(e.rd ORDER BY e.conv_id, e.member, e.sender),
           array_agg(e.all_del ORDER BY e.conv_id, e.member, e.sender),
           array_agg(e.all_rd ORDER BY e.conv_id, e.member, e.sender)
      INTO v_e_user, v_e_conv, v_e_member, v_e_del, v_e_read, v_e_all_del, v_e_all_read
      FROM entries e;
    IF v_e_user IS NULL THEN
        RETURN;
    END IF;

    -- 7. Append them: recipients' rows locked in id order, each head moved once by its
    --    count, positions taken in append order.
    PERFORM 1 FROM users u WHERE u.id = ANY (v_e_user) ORDER BY u.id FOR NO KEY UPDATE;
    RETURN QUERY
    WITH counts AS (
        SELECT r.id, count(*) AS n FROM unnest(v_e_user) AS r(id) GROUP BY r.id
    ), heads AS (
        UPDATE users u SET inbox_head = u.inbox_head + c.n
          FROM counts c WHERE u.id = c.id
        RETURNING u.id, u.inbox_head - c.n AS base
    ), entries AS (
        SELECT e.ord, e.u, h.base + row_number() OVER (PARTITION BY e.u ORDER BY e.ord) AS pos,
               e.c, e.m, e.d, e.r, e.ad, e.ar
          FROM unnest(v_e_user, v_e_conv, v_e_member, v_e_del, v_e_read, v_e_all_del,
                      v_e_all_read) WITH ORDINALITY AS e(u, c, m, d, r, ad, ar, ord)
          JOIN heads h ON h.id = e.u
    ), written AS (
        INSERT INTO inbox (user_id, inbox_seq, conv_id, msg_seq, receipt, ts)
        SELECT e.u, e.pos, e.c, NULL,
               '{"conv_id":' || e.c || ',"user_id":' || e.m || ',"delivered_seq":' || e.d
               || ',"read_seq":' || e.r || ',"all_delivered_seq":' || e.ad
               || ',"all_read_seq":' || e.ar || ',"ts":' || p_ts_json || '}',
               p_now
          FROM entries e
    )
    SELECT NULL::bigint, NULL::boolean, e.u, e.pos, e.c, e.m, e.d, e.r, e.ad, e.ar
      FROM entries e ORDER BY e.ord;
END
$fn$;
