-- Core key-management schema, PostgreSQL 12+.
--
-- Runs as a single script (no transaction control, no psql meta-commands) so
-- any migration tool can apply it. Every object name starts with the table
-- prefix and the prefix appears nowhere else, so the file can be re-targeted
-- to another prefix with a plain word-boundary substitution.
--
-- The trigger functions never name a table: they use tg_table_schema and
-- tg_table_name, so they keep working when the tables live in a schema that
-- is not on search_path, and one set of functions serves every table.

-- Rejects an update that changes any of the columns named in the trigger
-- arguments. Rows are compared as jsonb so one function fits every table.
create function kms_immutable_columns()
  returns trigger
  language plpgsql
as $$
declare
  old_row jsonb := to_jsonb(old);
  new_row jsonb := to_jsonb(new);
  col text;
begin
  foreach col in array tg_argv loop
    -- a misspelt argument would otherwise compare null with null and
    -- silently protect nothing
    if new_row -> col is null then
      raise exception 'trigger argument % is not a column of %.%',
        col, tg_table_schema, tg_table_name;
    end if;
    if old_row -> col is distinct from new_row -> col then
      raise exception 'immutable column: %.%', tg_table_name, col
        using errcode = '23601';
    end if;
  end loop;
  return new;
end;
$$;

-- The database, not the caller, decides when a row was created.
create function kms_default_create_time()
  returns trigger
  language plpgsql
as $$
begin
  new.create_time := now();
  return new;
end;
$$;

-- Used with "when (old.* is distinct from new.*)", so a no-op update keeps the
-- previous update_time.
create function kms_default_update_time()
  returns trigger
  language plpgsql
as $$
begin
  new.update_time := now();
  return new;
end;
$$;

-- Numbers versions 1, 2, 3, ... per parent key, ignoring any supplied value.
-- tg_argv[0] names the column holding the parent key. Rows inserted earlier
-- by the same statement are visible here, so a multi-row insert is numbered
-- correctly. Two transactions adding a version to the same parent at the
-- same time may compute the same number; the unique constraint on
-- (parent, version) then rejects one of them, which may retry.
create function kms_next_version()
  returns trigger
  language plpgsql
as $$
declare
  parent_col text := tg_argv[0];
begin
  execute format(
    'select coalesce(max(version), 0) + 1 from %I.%I where %I = $1',
    tg_table_schema, tg_table_name, parent_col)
    into new.version
    using to_jsonb(new) ->> parent_col;
  return new;
end;
$$;


-- Schema version ------------------------------------------------------------

create table kms_schema_version (
  version text not null,
  create_time timestamptz not null default now(),
  update_time timestamptz not null default now()
);
comment on table kms_schema_version is
  'Holds the single row recording which version of this schema is installed.';

-- Indexing a constant-true expression allows one row at most.
create unique index kms_schema_version_one_row
  on kms_schema_version ((version is not null));

create trigger kms_schema_version_create_time
  before insert on kms_schema_version
  for each row execute function kms_default_create_time();

create trigger kms_schema_version_immutable_columns
  before update on kms_schema_version
  for each row execute function kms_immutable_columns('create_time');

create trigger kms_schema_version_update_time
  before update on kms_schema_version
  for each row when (old.* is distinct from new.*)
  execute function kms_default_update_time();

insert into kms_schema_version (version) values ('v0.0.2');


-- Collection version --------------------------------------------------------

-- The times are timestamp without time zone for compatibility with existing
-- databases created by the Go package.
create table kms_collection_version (
  version bigint not null default 1
    check (version > 0),
  create_time timestamp not null default current_timestamp,
  update_time timestamp not null default current_timestamp
);
comment on table kms_collection_version is
  'Holds the single row whose version the library bumps whenever it adds, rotates or removes keys, so other processes know to reload them.';

create unique index kms_collection_version_one_row
  on kms_collection_version ((version is not null));

create trigger kms_collection_version_immutable_columns
  before update on kms_collection_version
  for each row execute function kms_immutable_columns('create_time');

create trigger kms_collection_version_update_time
  before update on kms_collection_version
  for each row when (old.* is distinct from new.*)
  execute function kms_default_update_time();

insert into kms_collection_version (version) values (1);


-- Root keys -----------------------------------------------------------------

create table kms_root_key (
  private_id text primary key
    check (length(trim(private_id)) > 0),
  scope_id text not null
    constraint kms_root_key_scope_id_key unique
    check (length(trim(scope_id)) > 0),
  create_time timestamptz not null default now()
);
comment on table kms_root_key is
  'Holds one root key per scope; its key material is kept in the root key versions.';

create trigger kms_root_key_create_time
  before insert on kms_root_key
  for each row execute function kms_default_create_time();

create trigger kms_root_key_immutable_columns
  before update on kms_root_key
  for each row execute function
    kms_immutable_columns('private_id', 'scope_id', 'create_time');


-- Root key versions ---------------------------------------------------------

-- version and key stay mutable: rewrapping replaces key and may renumber.
create table kms_root_key_version (
  private_id text primary key
    check (length(trim(private_id)) > 0),
  root_key_id text not null
    constraint kms_root_key_fkey
    references kms_root_key (private_id)
    on delete cascade
    on update cascade,
  version bigint not null
    check (version > 0),
  key bytea not null
    constraint kms_not_empty_key check (length(key) > 0),
  create_time timestamptz not null default now(),
  constraint kms_root_key_version_root_key_id_version_uq
    unique (root_key_id, version)
);
comment on table kms_root_key_version is
  'Holds the versions of each root key, with the key material encrypted by an external wrapper.';

create trigger kms_root_key_version_create_time
  before insert on kms_root_key_version
  for each row execute function kms_default_create_time();

create trigger kms_root_key_version_next_version
  before insert on kms_root_key_version
  for each row execute function kms_next_version('root_key_id');

create trigger kms_root_key_version_immutable_columns
  before update on kms_root_key_version
  for each row execute function
    kms_immutable_columns('private_id', 'root_key_id', 'create_time');


-- Data keys -----------------------------------------------------------------

create table kms_data_key (
  private_id text primary key
    check (length(trim(private_id)) > 0),
  root_key_id text not null
    constraint kms_root_key_fkey
    references kms_root_key (private_id)
    on delete cascade
    on update cascade,
  purpose text not null
    constraint kms_not_start_end_whitespace_purpose
    check (length(trim(purpose)) = length(purpose)),
  create_time timestamptz not null default now(),
  constraint kms_data_key_root_key_id_purpose_uq
    unique (root_key_id, purpose)
);
comment on table kms_data_key is
  'Holds one data key per root key and purpose; its key material is kept in the data key versions.';

create trigger kms_data_key_create_time
  before insert on kms_data_key
  for each row execute function kms_default_create_time();

create trigger kms_data_key_immutable_columns
  before update on kms_data_key
  for each row execute function
    kms_immutable_columns('private_id', 'root_key_id', 'purpose', 'create_time');


-- Data key versions ---------------------------------------------------------

-- version, key and root_key_version_id stay mutable: rewrapping under a new
-- root key version rewrites key and root_key_version_id.
create table kms_data_key_version (
  private_id text primary key
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
  version bigint not null
    check (version > 0),
  key bytea not null
    constraint kms_not_empty_key check (length(key) > 0),
  create_time timestamptz not null default now(),
  constraint kms_data_key_version_data_key_id_version_uq
    unique (data_key_id, version)
);
comment on table kms_data_key_version is
  'Holds the versions of each data key, with the key material encrypted by a root key version.';

-- Serves the "is this root key version still in use" check and the cascade
-- when a root key version is deleted.
create index kms_data_key_version_root_key_version_id_idx
  on kms_data_key_version (root_key_version_id);

create trigger kms_data_key_version_create_time
  before insert on kms_data_key_version
  for each row execute function kms_default_create_time();

create trigger kms_data_key_version_next_version
  before insert on kms_data_key_version
  for each row execute function kms_next_version('data_key_id');

create trigger kms_data_key_version_immutable_columns
  before update on kms_data_key_version
  for each row execute function
    kms_immutable_columns('private_id', 'data_key_id', 'create_time');
