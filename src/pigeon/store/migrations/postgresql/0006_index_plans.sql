-- The bulk functions' statements are key lookups and short key-range scans. On a new or
-- fast-growing table the planner's statistics lag behind (autovacuum analyzes a table a
-- minute or more after it grew): with a few hundred inbox rows on record, it planned a
-- sequential scan of the whole inbox for every batch of acks (8-9 ms at ~10 000 rows,
-- growing with the table, found with auto_explain under `pigeon bench direct --cluster`).
-- An index plan is the right one for these statements at any table size.
ALTER FUNCTION pigeon_ack(bigint[], bigint[], integer, double precision, text)
    SET enable_seqscan = off;
ALTER FUNCTION pigeon_send(bigint[], bigint[], bigint[], text[], text[], text[], double precision)
    SET enable_seqscan = off;
