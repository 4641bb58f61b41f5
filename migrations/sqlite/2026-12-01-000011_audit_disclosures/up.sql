-- Every patient an audit event names (CONTRACT §7: each patient whose data the response disclosed), so the
-- access report, the bulk-access rule and the incident report see search-based access too. One row per
-- (patient, event); backfilled from the single patient column of the events recorded before.
CREATE TABLE audit_patients (
    patient_id TEXT NOT NULL,
    seq        BIGINT NOT NULL,
    recorded   BIGINT NOT NULL,
    PRIMARY KEY (patient_id, seq)
);
INSERT INTO audit_patients (patient_id, seq, recorded)
    SELECT patient_id, seq, recorded FROM audit_events WHERE patient_id IS NOT NULL;
CREATE INDEX audit_patients_seq ON audit_patients (seq);

-- The FHIR action code (C/R/U/D/E) as a column, so AuditEvent?action= is answered in SQL.
ALTER TABLE audit_events ADD COLUMN action TEXT NOT NULL DEFAULT 'E';
UPDATE audit_events SET action = json_extract(body, '$.action');
CREATE INDEX audit_events_action ON audit_events (action, seq);
CREATE INDEX audit_events_recorded_seq ON audit_events (recorded, seq);
