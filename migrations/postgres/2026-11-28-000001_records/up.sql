-- FHIR resources: the current version of each, its full history, and the search index.
-- `content` is the FHIR JSON document whose PHI elements are stored as opaque (encrypted) values;
-- every column beside it is non-PHI and queryable. Times are Unix microseconds (UTC).
CREATE TABLE resources (
    resource_type TEXT NOT NULL,
    id            TEXT NOT NULL,
    version_id    BIGINT NOT NULL,
    last_updated  BIGINT NOT NULL,
    deleted       BOOLEAN NOT NULL DEFAULT FALSE,
    patient_id    TEXT,
    key_version   INTEGER NOT NULL DEFAULT 0,
    content       TEXT NOT NULL,
    PRIMARY KEY (resource_type, id)
);
CREATE INDEX resources_patient ON resources (patient_id, resource_type);
CREATE INDEX resources_key_version ON resources (key_version);

CREATE TABLE resource_history (
    resource_type TEXT NOT NULL,
    id            TEXT NOT NULL,
    version_id    BIGINT NOT NULL,
    last_updated  BIGINT NOT NULL,
    deleted       BOOLEAN NOT NULL DEFAULT FALSE,
    key_version   INTEGER NOT NULL DEFAULT 0,
    content       TEXT NOT NULL,
    PRIMARY KEY (resource_type, id, version_id)
);
CREATE INDEX resource_history_key_version ON resource_history (key_version);

-- One row per searchable value of the current version: a plain token for non-PHI parameters,
-- a keyed blind index for PHI ones. Rebuilt on every write of the resource.
CREATE TABLE search_index (
    resource_type TEXT NOT NULL,
    id            TEXT NOT NULL,
    param         TEXT NOT NULL,
    value         TEXT NOT NULL,
    PRIMARY KEY (resource_type, param, value, id)
);
CREATE INDEX search_index_resource ON search_index (resource_type, id);

-- Care relationships derived from active CareTeam resources (subject + participant.member Practitioner);
-- rebuilt on every write of a CareTeam, read on every request of a clinician or nurse.
CREATE TABLE care_relationships (
    careteam_id     TEXT NOT NULL,
    patient_id      TEXT NOT NULL,
    practitioner_id TEXT NOT NULL,
    PRIMARY KEY (careteam_id, practitioner_id, patient_id)
);
CREATE INDEX care_relationships_practitioner ON care_relationships (practitioner_id, patient_id);
