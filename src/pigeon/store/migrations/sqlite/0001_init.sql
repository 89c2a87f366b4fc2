-- Pigeon schema, version 1 (SQLite).
--
-- Keyed for partitioning: messages, members, fanout_* by conversation id; inbox and devices
-- by user id. Hot append tables (messages, inbox) are ordinary rowid tables, appended in
-- arrival order, with a UNIQUE index on the logical key: in WAL mode this writes far fewer
-- pages per batched commit than a WITHOUT ROWID clustered layout (research/limits.md, 3a).

CREATE TABLE users (
    id            INTEGER PRIMARY KEY,
    username      TEXT    NOT NULL UNIQUE COLLATE NOCASE,
    display_name  TEXT    NOT NULL,
    password_hash TEXT    NOT NULL,
    created_at    REAL    NOT NULL,
    inbox_head    INTEGER NOT NULL DEFAULT 0,  -- newest inbox_seq
    inbox_floor   INTEGER NOT NULL DEFAULT 0   -- entries at or below were pruned
);

CREATE TABLE devices (
    id         INTEGER PRIMARY KEY,
    user_id    INTEGER NOT NULL REFERENCES users(id),
    name       TEXT    NOT NULL,
    token_hash TEXT    NOT NULL UNIQUE,
    created_at REAL    NOT NULL,
    revoked_at REAL,
    cursor     INTEGER NOT NULL DEFAULT 0      -- highest inbox_seq acked by this device
);
CREATE INDEX devices_user ON devices(user_id);

CREATE TABLE conversations (
    id            INTEGER PRIMARY KEY,
    kind          TEXT    NOT NULL CHECK (kind IN ('direct', 'group')),
    title         TEXT    NOT NULL DEFAULT '',
    direct_key    TEXT    UNIQUE,              -- "min:max" user ids; NULL for groups
    created_at    REAL    NOT NULL,
    last_seq      INTEGER NOT NULL DEFAULT 0,
    last_activity REAL    NOT NULL
);

CREATE TABLE members (
    conv_id       INTEGER NOT NULL REFERENCES conversations(id),
    user_id       INTEGER NOT NULL REFERENCES users(id),
    role          TEXT    NOT NULL CHECK (role IN ('admin', 'member')),
    joined_at     REAL    NOT NULL,
    joined_seq    INTEGER NOT NULL,            -- last_seq when joining: fan-out starts after it
    delivered_seq INTEGER NOT NULL,
    read_seq      INTEGER NOT NULL,
    PRIMARY KEY (conv_id, user_id),
    CHECK (read_seq <= delivered_seq)
);
CREATE INDEX members_user ON members(user_id);

CREATE TABLE messages (
    conv_id       INTEGER NOT NULL REFERENCES conversations(id),
    seq           INTEGER NOT NULL,
    sender_id     INTEGER NOT NULL,
    sender_device INTEGER NOT NULL,            -- 0 for system messages
    client_id     TEXT    NOT NULL,
    kind          TEXT    NOT NULL,
    body          TEXT    NOT NULL,
    ts            REAL    NOT NULL
);
CREATE UNIQUE INDEX messages_conv_seq ON messages(conv_id, seq);
CREATE UNIQUE INDEX messages_idempotency ON messages(sender_device, client_id)
    WHERE sender_device <> 0;

CREATE TABLE fanout_jobs (
    conv_id INTEGER NOT NULL,
    seq     INTEGER NOT NULL,
    PRIMARY KEY (conv_id, seq)
);

CREATE TABLE fanout_leases (
    conv_id    INTEGER PRIMARY KEY,
    owner      TEXT    NOT NULL,
    expires_at REAL    NOT NULL
);

CREATE TABLE inbox (
    user_id   INTEGER NOT NULL,
    inbox_seq INTEGER NOT NULL,
    conv_id   INTEGER NOT NULL,
    msg_seq   INTEGER,                         -- a message entry: messages(conv_id, seq)
    receipt   TEXT,                            -- a receipt entry: ReceiptState fields, JSON
    ts        REAL    NOT NULL,
    CHECK ((msg_seq IS NULL) <> (receipt IS NULL))
);
CREATE UNIQUE INDEX inbox_user_seq ON inbox(user_id, inbox_seq);
