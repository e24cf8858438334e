-- Core key-management schema, SQLite 3.35+.
--
-- Runs as a single script (no transaction control) so any migration tool or
-- sqlite3.executescript can apply it. Every object name starts with the table
-- prefix and the prefix appears nowhere else, so the file can be re-targeted
-- to another prefix with a plain word-boundary substitution.
--
-- Foreign keys are only enforced on connections that run
-- "pragma foreign_keys = on"; the library does so on every connection.
--
-- SQLite triggers cannot modify NEW, so the rules PostgreSQL implements by
-- rewriting the row are implemented here differently:
--   * version is assigned by an AFTER INSERT trigger that updates the new
--     row. The column therefore accepts NULL until that trigger has run;
--     afterwards a guard forbids setting it back to NULL. RETURNING shows the
--     value from before the trigger, so callers re-select the row.
--   * create_time is guarded rather than overwritten: an insert must leave it
--     at its default. SQLite evaluates 'now' once per statement, so the
--     default always equals current_timestamp inside the trigger, and any
--     other value is rejected. Overwriting it afterwards is not an option
--     because the immutable-column trigger forbids changing create_time.
-- Timestamps are UTC text ('YYYY-MM-DD HH:MM:SS'), as current_timestamp gives.
-- Non-integer primary keys in SQLite accept NULL unless declared not null,
-- hence the explicit "not null" on every private_id.


-- Schema version ------------------------------------------------------------

create table kms_schema_version (
  version text not null,
  create_time timestamp not null default current_timestamp,
  update_time timestamp not null default current_timestamp
);

-- Indexing a constant-true expression allows one row at most.
create unique index kms_schema_version_one_row
  on kms_schema_version ((version is not null));

create trigger kms_schema_version_create_time
before insert on kms_schema_version
for each row when new.create_time is not current_timestamp
begin
  select raise(abort, 'kms: create_time is assigned by the database');
end;

create trigger kms_schema_version_immutable_columns
before update on kms_schema_version
for each row
begin
  select raise(abort, 'immutable column: kms_schema_version.create_time')
   where new.create_time is not old.create_time;
end;

-- Recursive triggers are off by default, so this update does not re-fire the
-- trigger; if they are on, the second pass finds nothing changed and stops.
create trigger kms_schema_version_update_time
after update on kms_schema_version
for each row
when new.version is not old.version
  or new.create_time is not old.create_time
  or new.update_time is not old.update_time
begin
  update kms_schema_version
     set update_time = current_timestamp
   where rowid = new.rowid;
end;

insert into kms_schema_version (version) values ('v0.0.2');


-- Collection version --------------------------------------------------------

create table kms_collection_version (
  version integer not null default 1
    check (version > 0),
  create_time timestamp not null default current_timestamp,
  update_time timestamp not null default current_timestamp
);

create unique index kms_collection_version_one_row
  on kms_collection_version ((version is not null));

create trigger kms_collection_version_immutable_columns
before update on kms_collection_version
for each row
begin
  select raise(abort, 'immutable column: kms_collection_version.create_time')
   where new.create_time is not old.create_time;
end;

create trigger kms_collection_version_update_time
after update on kms_collection_version
for each row
when new.version is not old.version
  or new.create_time is not old.create_time
  or new.update_time is not old.update_time
begin
  update kms_collection_version
     set update_time = current_timestamp
   where rowid = new.rowid;
end;

insert into kms_collection_version (version) values (1);


-- Root keys -----------------------------------------------------------------

create table kms_root_key (
  private_id text not null primary key
    check (length(trim(private_id)) > 0),
  scope_id text not null
    constraint kms_root_key_scope_id_key unique
    check (length(trim(scope_id)) > 0),
  create_time timestamp not null default current_timestamp
);

create trigger kms_root_key_create_time
before insert on kms_root_key
for each row when new.create_time is not current_timestamp
begin
  select raise(abort, 'kms: create_time is assigned by the database');
end;

create trigger kms_root_key_immutable_columns
before update on kms_root_key
for each row
begin
  select raise(abort, 'immutable column: kms_root_key.private_id')
   where new.private_id is not old.private_id;
  select raise(abort, 'immutable column: kms_root_key.scope_id')
   where new.scope_id is not old.scope_id;
  select raise(abort, 'immutable column: kms_root_key.create_time')
   where new.create_time is not old.create_time;
end;


-- Root key versions ---------------------------------------------------------

-- version is nullable only so that it can be filled in after the insert (see
-- the top of the file); version and key stay mutable for rewrapping.
create table kms_root_key_version (
  private_id text not null primary key
    check (length(trim(private_id)) > 0),
  root_key_id text not null
    constraint kms_root_key_fkey
    references kms_root_key (private_id)
    on delete cascade
    on update cascade,
  version integer
    check (version > 0),
  key bytea not null
    constraint kms_not_empty_key check (length(key) > 0),
  create_time timestamp not null default current_timestamp,
  constraint kms_root_key_version_root_key_id_version_uq
    unique (root_key_id, version)
);

create trigger kms_root_key_version_create_time
before insert on kms_root_key_version
for each row when new.create_time is not current_timestamp
begin
  select raise(abort, 'kms: create_time is assigned by the database');
end;

-- Numbers versions 1, 2, 3, ... per root key, ignoring any supplied value.
create trigger kms_root_key_version_next_version
after insert on kms_root_key_version
for each row
begin
  update kms_root_key_version
     set version = coalesce(
           (select max(version)
              from kms_root_key_version
             where root_key_id = new.root_key_id
               and rowid <> new.rowid),
           0) + 1
   where rowid = new.rowid;
end;

-- The check constraint rejects version <= 0 but lets NULL through.
create trigger kms_root_key_version_version_not_null
before update of version on kms_root_key_version
for each row when new.version is null
begin
  select raise(abort, 'NOT NULL constraint failed: kms_root_key_version.version');
end;

create trigger kms_root_key_version_immutable_columns
before update on kms_root_key_version
for each row
begin
  select raise(abort, 'immutable column: kms_root_key_version.private_id')
   where new.private_id is not old.private_id;
  select raise(abort, 'immutable column: kms_root_key_version.root_key_id')
   where new.root_key_id is not old.root_key_id;
  select raise(abort, 'immutable column: kms_root_key_version.create_time')
   where new.create_time is not old.create_time;
end;


-- Data keys -----------------------------------------------------------------

create table kms_data_key (
  private_id text not null primary key
    check (length(trim(private_id)) > 0),
  root_key_id text not null
    constraint kms_root_key_fkey
    references kms_root_key (private_id)
    on delete cascade
    on update cascade,
  purpose text not null
    constraint kms_not_start_end_whitespace_purpose
    check (length(trim(purpose)) = length(purpose)),
  create_time timestamp not null default current_timestamp,
  constraint kms_data_key_root_key_id_purpose_uq
    unique (root_key_id, purpose)
);

create trigger kms_data_key_create_time
before insert on kms_data_key
for each row when new.create_time is not current_timestamp
begin
  select raise(abort, 'kms: create_time is assigned by the database');
end;

create trigger kms_data_key_immutable_columns
before update on kms_data_key
for each row
begin
  select raise(abort, 'immutable column: kms_data_key.private_id')
   where new.private_id is not old.private_id;
  select raise(abort, 'immutable column: kms_data_key.root_key_id')
   where new.root_key_id is not old.root_key_id;
  select raise(abort, 'immutable column: kms_data_key.purpose')
   where new.purpose is not old.purpose;
  select raise(abort, 'immutable column: kms_data_key.create_time')
   where new.create_time is not old.create_time;
end;


-- Data key versions ---------------------------------------------------------

-- version, key and root_key_version_id stay mutable: rewrapping under a new
-- root key version rewrites key and root_key_version_id.
create table kms_data_key_version (
  private_id text not null primary key
    check (length(trim(private_id)) > 0),
  data_key_id text not null
    constraint kms_data_key_fkey
    references kms_data_key (private_id)
    on delete cascade
    on update cascade,
  root_key_version_id text not null
    constraint kms_root_key_version_fkey
    references kms_root_key_version (private_id)
    on delete cascade
    on update cascade,
  version integer
    check (version > 0),
  key bytea not null
    constraint kms_not_empty_key check (length(key) > 0),
  create_time timestamp not null default current_timestamp,
  constraint kms_data_key_version_data_key_id_version_uq
    unique (data_key_id, version)
);

-- Serves the "is this root key version still in use" check and the cascade
-- when a root key version is deleted.
create index kms_data_key_version_root_key_version_id_idx
  on kms_data_key_version (root_key_version_id);

create trigger kms_data_key_version_create_time
before insert on kms_data_key_version
for each row when new.create_time is not current_timestamp
begin
  select raise(abort, 'kms: create_time is assigned by the database');
end;

-- Numbers versions 1, 2, 3, ... per data key, ignoring any supplied value.
create trigger kms_data_key_version_next_version
after insert on kms_data_key_version
for each row
begin
  update kms_data_key_version
     set version = coalesce(
           (select max(version)
              from kms_data_key_version
             where data_key_id = new.data_key_id
               and rowid <> new.rowid),
           0) + 1
   where rowid = new.rowid;
end;

create trigger kms_data_key_version_version_not_null
before update of version on kms_data_key_version
for each row when new.version is null
begin
  select raise(abort, 'NOT NULL constraint failed: kms_data_key_version.version');
end;

create trigger kms_data_key_version_immutable_columns
before update on kms_data_key_version
for each row
begin
  select raise(abort, 'immutable column: kms_data_key_version.private_id')
   where new.private_id is not old.private_id;
  select raise(abort, 'immutable column: kms_data_key_version.data_key_id')
   where new.data_key_id is not old.data_key_id;
  select raise(abort, 'immutable column: kms_data_key_version.create_time')
   where new.create_time is not old.create_time;
end;
