-- Encryptions counted per data key version, SQLite.
--
-- Every kms_async instance counts, in memory, how many values it encrypts
-- under each data key version and adds its counts here every few seconds
-- (KMS.open(usage_flush_interval=...)) and when it closes, so that
-- encryptions sums the whole fleet's. KMS.census() reports the counts and
-- KMS.rotate_due() rotates keys that have encrypted too much: AES-GCM with
-- random nonces must not encrypt more than 2^32 values under one key.
-- A crash loses at most the counts of one flush interval.
--
-- The table has no foreign key to kms_data_key_version on purpose: tools
-- that look for tables referencing key versions (to find application rows
-- still encrypted under one) must not count it, and a revoke must not be
-- refused because a version was counted. Counts are only added for
-- versions that exist when they are added; revoking a version through
-- kms_async deletes its row here too.
--
-- The Go package ignores this table (its encryptions are not counted).
-- Safe to run twice.

create table if not exists kms_key_version_usage (
  key_version_id text primary key,
  encryptions integer not null default 0 check (encryptions >= 0),
  update_time timestamp not null default current_timestamp
);
