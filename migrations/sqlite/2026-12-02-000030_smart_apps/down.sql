ALTER TABLE sessions DROP COLUMN launch_patient;
ALTER TABLE sessions DROP COLUMN scope;
ALTER TABLE sessions DROP COLUMN client_id;
DROP TABLE client_assertions;
DROP TABLE smart_authorizations;
DROP TABLE apps;
