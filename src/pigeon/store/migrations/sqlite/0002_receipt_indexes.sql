-- The aggregate receipt ("everyone has it up to here") is a minimum over the members:
-- with these it is an index lookup, not a scan of a big group.
CREATE INDEX members_delivered ON members(conv_id, delivered_seq);
CREATE INDEX members_read ON members(conv_id, read_seq);
