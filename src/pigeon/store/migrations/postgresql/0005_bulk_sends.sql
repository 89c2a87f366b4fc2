-- Sends in bulk: `pigeon_send` commits a batch of send requests (one process's queued
-- sends) in ONE statement, i.e. one round trip and one short transaction, instead of ~8
-- round trips with the conversations' row locks held across all of them. Same records as
-- the batch of statements it replaces:
--
-- * a request whose (sender_device, client_id) is already committed (sender_device <> 0)
--   gets the original's conversation, seq and ts, marked duplicate, even if the sender is
--   no longer a member;
-- * otherwise, if an earlier request of the batch with the same key was accepted, the
--   request shares its result, marked duplicate (as it would if the two were committed in
--   different batches);
-- * otherwise a sender who is not a member of the conversation (or no such conversation)
--   gets code 2 (NotMember) and writes nothing;
-- * otherwise the request is accepted;
-- * each conversation's accepted requests take the seqs after its last_seq, gapless, in
--   request order; last_seq and last_activity move; each message gets its fan-out job;
-- * each sender's own delivered_seq and read_seq move to its last new seq there (never
--   back).
--
-- Bodies longer than the limit never get here (the caller checks them first).
--
-- Locks, in the store's global order: conversations (id order) before anything is read, so
-- a concurrent membership change or retry of the same send has either committed (and is
-- seen) or waits for this; then the senders' members rows ((conv_id, user_id) order), as
-- pigeon_ack locks them. Nothing else is locked: messages and fan-out jobs are new rows
-- (the foreign key check of a message share-locks its conversation, already held). A retry
-- of the same key in another conversation committing meanwhile makes the insert fail with a
-- unique violation; the caller then sends the batch's requests one by one, as before.
--
-- Returns one row per request, in request order: out_code 0 (sent), 1 (duplicate) or
-- 2 (not a member), and for 0 and 1 the result's conversation, seq and ts.

CREATE OR REPLACE FUNCTION pigeon_send(
    p_conv bigint[],
    p_sender bigint[],
    p_device bigint[],
    p_client text[],
    p_kind text[],
    p_body text[],
    p_now double precision
) RETURNS TABLE (
    out_code integer,
    out_conv bigint,
    out_seq bigint,
    out_ts double precision
) LANGUAGE plpgsql AS $fn$
DECLARE
    v_c_id bigint[];  v_c_last bigint[];
    v_code integer[];  v_conv bigint[];  v_seq bigint[];  v_ts double precision[];
    v_n_conv bigint[];  v_n_seq bigint[];  v_n_sender bigint[];  v_n_device bigint[];
    v_n_client text[];  v_n_kind text[];  v_n_body text[];
BEGIN
    -- 1. Conversations locked in id order, and their last seqs (of the row as locked);
    --    everything below reads after the lock.
    SELECT array_agg(l.id ORDER BY l.id), array_agg(l.last_seq ORDER BY l.id)
      INTO v_c_id, v_c_last
      FROM (SELECT c.id, c.last_seq FROM conversations c WHERE c.id = ANY (p_conv)
             ORDER BY c.id FOR UPDATE) l;

    -- 2. Each request's outcome, and the seqs of the new messages. One index lookup per
    --    request for the idempotency key and the membership, then window functions over
    --    the batch (no join of the batch with itself).
    WITH req AS (
        SELECT r.ord, r.conv, r.sender, r.device, r.client, r.kind, r.body,
               f.conv_id AS f_conv, f.seq AS f_seq, f.ts AS f_ts,
               coalesce((SELECT true FROM members mb
                          WHERE mb.conv_id = r.conv AND mb.user_id = r.sender), false)
                   AS member,
               v_c_last[array_position(v_c_id, r.conv)] AS last_seq
          FROM unnest(p_conv, p_sender, p_device, p_client, p_kind, p_body)
               WITH ORDINALITY AS r(conv, sender, device, client, kind, body, ord)
          -- LIMIT keeps this a lookup per request (never a scan of messages);
          -- "sender_device <> 0" lets PostgreSQL use the partial unique index.
          LEFT JOIN LATERAL (SELECT m.conv_id, m.seq, m.ts FROM messages m
                              WHERE m.sender_device = r.device AND m.client_id = r.client
                                AND m.sender_device <> 0 AND r.device <> 0
                              LIMIT 1) f ON true
    ), keyed AS (
        -- Among the requests of a key with no committed original, the first whose sender
        -- is a member is the original; the key's later requests repeat it (members or
        -- not, as a retry in a later batch would). Device 0 has no key.
        SELECT q.*,
               min(q.ord) FILTER (WHERE q.f_seq IS NULL AND q.member) OVER k AS original
          FROM req q
        WINDOW k AS (PARTITION BY q.device, CASE WHEN q.device <> 0 THEN q.client END,
                                  CASE WHEN q.device = 0 THEN q.ord END)
    ), numbered AS (
        -- Each conversation's new messages take the seqs after its last, in request order.
        SELECT q.*, q.ord = q.original AS new,
               CASE WHEN q.ord = q.original THEN q.last_seq + count(*)
                   FILTER (WHERE q.ord = q.original)
                   OVER (PARTITION BY q.conv ORDER BY q.ord) END AS n_seq
          FROM keyed q
    ), outcome AS (
        SELECT q.ord, q.new, q.sender, q.device, q.client, q.kind, q.body,
               CASE WHEN q.f_seq IS NOT NULL THEN 1
                    WHEN q.original IS NULL OR q.ord < q.original THEN 2
                    WHEN q.new THEN 0
                    ELSE 1 END AS code,
               CASE WHEN q.f_seq IS NOT NULL THEN q.f_conv
                    WHEN q.ord >= q.original THEN max(q.conv) FILTER (WHERE q.new) OVER k
               END AS conv,
               CASE WHEN q.f_seq IS NOT NULL THEN q.f_seq
                    WHEN q.ord >= q.original THEN max(q.n_seq) FILTER (WHERE q.new) OVER k
               END AS seq,
               CASE WHEN q.f_seq IS NOT NULL THEN q.f_ts
                    WHEN q.ord >= q.original THEN p_now END AS ts
          FROM numbered q
        WINDOW k AS (PARTITION BY q.device, CASE WHEN q.device <> 0 THEN q.client END,
                                  CASE WHEN q.device = 0 THEN q.ord END)
    )
    SELECT array_agg(o.code ORDER BY o.ord), array_agg(o.conv ORDER BY o.ord),
           array_agg(o.seq ORDER BY o.ord), array_agg(o.ts ORDER BY o.ord),
           array_agg(o.conv ORDER BY o.ord) FILTER (WHERE o.new),
           array_agg(o.seq ORDER BY o.ord) FILTER (WHERE o.new),
           array_agg(o.sender ORDER BY o.ord) FILTER (WHERE o.new),
           array_agg(o.device ORDER BY o.ord) FILTER (WHERE o.new),
           array_agg(o.client ORDER BY o.ord) FILTER (WHERE o.new),
           array_agg(o.kind ORDER BY o.ord) FILTER (WHERE o.new),
           array_agg(o.body ORDER BY o.ord) FILTER (WHERE o.new)
      INTO v_code, v_conv, v_seq, v_ts,
           v_n_conv, v_n_seq, v_n_sender, v_n_device, v_n_client, v_n_kind, v_n_body
      FROM outcome o;

    IF v_n_conv IS NOT NULL THEN
        -- 3. The conversations' counters (rows already locked).
        UPDATE conversations c SET last_seq = n.last, last_activity = p_now
          FROM (SELECT x.conv, max(x.seq) AS last
                  FROM unnest(v_n_conv, v_n_seq) AS x(conv, seq) GROUP BY x.conv) n
         WHERE c.id = n.conv;

        -- 4. The messages and their fan-out jobs.
        WITH added AS (
            INSERT INTO messages (conv_id, seq, sender_id, sender_device, client_id, kind,
                                  body, ts)
            SELECT n.*, p_now
              FROM unnest(v_n_conv, v_n_seq, v_n_sender, v_n_device, v_n_client, v_n_kind,
                          v_n_body) AS n
            RETURNING conv_id, seq
        )
        INSERT INTO fanout_jobs (conv_id, seq) SELECT a.conv_id, a.seq FROM added a;

        -- 5. The senders' own positions: members rows locked in (conv_id, user_id) order,
        --    then moved to each sender's last new seq in the conversation.
        UPDATE members m SET delivered_seq = greatest(m.delivered_seq, o.seq),
                             read_seq = greatest(m.read_seq, o.seq)
          FROM (SELECT l.conv_id, l.user_id, s.seq
                  FROM members l
                  JOIN (SELECT x.conv, x.sender, max(x.seq) AS seq
                          FROM unnest(v_n_conv, v_n_sender, v_n_seq) AS x(conv, sender, seq)
                         GROUP BY x.conv, x.sender) s
                    ON l.conv_id = s.conv AND l.user_id = s.sender
                 ORDER BY l.conv_id, l.user_id
                   FOR NO KEY UPDATE OF l) o
         WHERE m.conv_id = o.conv_id AND m.user_id = o.user_id;
    END IF;

    RETURN QUERY SELECT x.code, x.conv, x.seq, x.ts
                   FROM unnest(v_code, v_conv, v_seq, v_ts)
                        WITH ORDINALITY AS x(code, conv, seq, ts, ord)
                  ORDER BY x.ord;
END
$fn$;
