package pgstore

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
)

// EventType says what happened to a table or record.
type EventType uint8

// The event types. CreateTable and DestroyTable come from the connector's DDL,
// Insert, Update and Delete from triggers on the record tables, and Resync from
// the subscriber's own side when events may have been missed.
const (
	CreateTable EventType = iota + 1
	DestroyTable
	Insert
	Update
	Delete
	// Resync means events may have been lost (the LISTEN connection was
	// re-established, or the subscription's queue overflowed): re-read every
	// record you hold.
	Resync
)

var eventNames = [...]string{
	CreateTable:  "CREATE_TABLE",
	DestroyTable: "DESTROY_TABLE",
	Insert:       "INSERT",
	Update:       "UPDATE",
	Delete:       "DELETE",
	Resync:       "RESYNC",
}

// String returns the deepstream name of the event type, such as "INSERT".
func (t EventType) String() string {
	if t >= CreateTable && t <= Resync {
		return eventNames[t]
	}
	return fmt.Sprintf("EventType(%d)", uint8(t))
}

// payloadOps are the "op" values of notification payloads.
var payloadOps = map[string]EventType{
	"create_table":  CreateTable,
	"destroy_table": DestroyTable,
	"insert":        Insert,
	"update":        Update,
	"delete":        Delete,
}

func (t EventType) payloadOp() string {
	return strings.ToLower(t.String())
}

// eventSet is a set of event types, one bit each.
type eventSet uint8

const allEvents = eventSet(1<<CreateTable | 1<<DestroyTable | 1<<Insert | 1<<Update | 1<<Delete)

func (s eventSet) has(t EventType) bool { return s&(1<<t) != 0 }

// WithEvents sets which events the database generates for this schema:
// CreateTable, DestroyTable, Insert, Update, Delete. A type left out costs
// nothing at write time, because its trigger is not installed; WithEvents()
// with no types turns the change feed off. The triggers of existing tables are
// brought in line when the connector starts. Defaults to all five.
func WithEvents(types ...EventType) Option {
	return func(c *config) error {
		var set eventSet
		for _, t := range types {
			if t < CreateTable || t > Delete {
				return fmt.Errorf("WithEvents: %v cannot be switched; choose among CREATE_TABLE, DESTROY_TABLE, INSERT, UPDATE and DELETE", t)
			}
			set |= 1 << t
		}
		c.events = set
		return nil
	}
}

// notifyFunction is the trigger function pgstore installs in its schema. The
// version suffix lets a later release install a changed function beside it.
const notifyFunction = "pgstore_notify_v1"

// Payload budget. NOTIFY refuses payloads of 8000 bytes or more. Rows are
// grouped into chunks of under chunkBytes of JSON; an id whose JSON text would
// exceed inlineIDBytes (possible only with many escaped characters) is sent in
// base64, which for MaxIDBytes is at most 3592 bytes. A chunk is then at most
// chunkBytes plus one row, plus a header with the table name (at most 63
// bytes, 6 when escaped): under 7900 bytes.
const (
	chunkBytes    = 3700
	inlineIDBytes = 3600
)

// notifyFunctionSQL creates the statement-level trigger function: one
// notification per chunk of changed rows, on the channel named after the
// schema, with the payload
//
//	{"op": "insert", "table": "cars", "rows": [["bmw", 3], [null, 4, "<base64 id>"]]}
func notifyFunctionSQL(schema string) string {
	return fmt.Sprintf(`CREATE FUNCTION %s.%s() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE
	payload text;
BEGIN
	FOR payload IN
		SELECT json_build_object('op', lower(TG_OP), 'table', TG_TABLE_NAME, 'rows', json_agg(e))::text
		FROM (
			SELECT e, sum(octet_length(e::text) + 2) OVER (ROWS UNBOUNDED PRECEDING) / %d AS chunk
			FROM (
				SELECT CASE WHEN octet_length(to_json(id)::text) <= %d
					THEN json_build_array(id, version)
					ELSE json_build_array(NULL, version, translate(encode(convert_to(id, 'UTF8'), 'base64'), E'\n', ''))
				END AS e
				FROM changed_rows
			) AS r
		) AS c
		GROUP BY chunk
	LOOP
		PERFORM pg_notify(TG_TABLE_SCHEMA, payload);
	END LOOP;
	RETURN NULL;
END
$fn$`, pgx.Identifier{schema}.Sanitize(), notifyFunction, chunkBytes, inlineIDBytes)
}

// rowTriggers are the statement-level triggers of a record table, by event.
var rowTriggers = []struct {
	event      EventType
	name, when string
}{
	{Insert, "pgstore_insert", "AFTER INSERT ON %s REFERENCING NEW TABLE AS changed_rows"},
	{Update, "pgstore_update", "AFTER UPDATE ON %s REFERENCING NEW TABLE AS changed_rows"},
	{Delete, "pgstore_delete", "AFTER DELETE ON %s REFERENCING OLD TABLE AS changed_rows"},
}

// triggerSQL returns the statements that create the triggers for the events
// in the set.
func triggerSQL(schema, table string, events eventSet) []string {
	ident := pgx.Identifier{schema, table}.Sanitize()
	var stmts []string
	for _, tr := range rowTriggers {
		if events.has(tr.event) {
			stmts = append(stmts, fmt.Sprintf("CREATE TRIGGER %s "+tr.when+" FOR EACH STATEMENT EXECUTE FUNCTION %s.%s()",
				tr.name, ident, pgx.Identifier{schema}.Sanitize(), notifyFunction))
		}
	}
	return stmts
}

// notifyDDL announces a table created or dropped, inside the DDL's transaction
// so that the event is sent exactly when the change commits.
func notifyDDL(ctx context.Context, tx pgx.Tx, schema string, t EventType, table string) error {
	payload, err := json.Marshal(struct {
		Op    string `json:"op"`
		Table string `json:"table"`
	}{t.payloadOp(), table})
	if err != nil {
		return err
	}
	_, err = tx.Exec(ctx, "SELECT pg_notify($1, $2)", schema, string(payload))
	return err
}
