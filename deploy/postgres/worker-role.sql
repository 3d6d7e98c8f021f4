-- The worker's role and database (see init-worker-role.sh): it owns its
-- database and the schema it migrates, and has no other right. psql sets
-- :password from the secret file.
CREATE ROLE rotation_worker LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION
    PASSWORD :'password';
CREATE DATABASE rotation_worker OWNER rotation_worker;
\connect rotation_worker
-- PostgreSQL 15 and later: only the database owner may create in public.
REVOKE ALL ON SCHEMA public FROM PUBLIC;
ALTER SCHEMA public OWNER TO rotation_worker;
