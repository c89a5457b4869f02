package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"

	"github.com/pgstore/pgstore"
)

// Limits of the protocol. A message longer than the value limit plus
// messageOverhead closes the connection (WebSocket status 1009); a value over
// the limit in a shorter message is refused with an error and the connection
// carries on.
const (
	defaultMaxValueBytes    = 64 << 10
	maxValueBytesLimit      = maxListBytes // so that a list reply can hold any record
	messageOverhead         = 32 << 10     // room for the key (escaped) and the other fields
	maxIDBytes              = 128          // of the client-chosen request id
	maxTableBytes           = 63           // PostgreSQL's identifier limit
	defaultMaxSubscriptions = 10000        // keys and tables, per connection
	maxListRecords          = 1000         // per "list" reply
	maxListBytes            = 4 << 20      // of values, per "list" reply; pgstore's default value limit too
)

// Limits bound what one client may do. What goes beyond them is refused with
// an error, and the connection carries on. A zero field means its default.
type Limits struct {
	// MaxValueBytes bounds the JSON text of a value a client sets
	// (too_large). A message longer than it by more than 32 KiB ends the
	// connection. Defaults to 64 KiB; more than 4 MiB is refused by
	// pgstore's own limit (WithMaxValueBytes).
	MaxValueBytes int
	// MaxSubscriptions bounds the keys and tables one connection subscribes
	// to (too_many). Defaults to 10,000.
	MaxSubscriptions int
	// MessagesPerSecond bounds the messages one connection sends, in bursts
	// of up to a second's worth (rate_limited). Defaults to no limit.
	MessagesPerSecond int
}

func (l Limits) withDefaults() Limits {
	if l.MaxValueBytes <= 0 {
		l.MaxValueBytes = defaultMaxValueBytes
	}
	if l.MaxSubscriptions <= 0 {
		l.MaxSubscriptions = defaultMaxSubscriptions
	}
	return l
}

// readLimit is the longest message a client may send.
func (l Limits) readLimit() int64 { return int64(l.MaxValueBytes) + messageOverhead }

// A request is a message from a client. Which fields matter depends on Type;
// the rest are ignored.
type request struct {
	Type    string          `json:"type"`
	ID      json.RawMessage `json:"id,omitempty"`
	Key     string          `json:"key,omitempty"`
	Table   string          `json:"table,omitempty"`
	Version *int64          `json:"version,omitempty"`
	Value   json.RawMessage `json:"value,omitempty"`
}

// Messages from the server. Replies echo the request's id; pushes have none.
type (
	okReply struct {
		Type    string          `json:"type"` // "ok"
		ID      json.RawMessage `json:"id,omitempty"`
		Key     string          `json:"key,omitempty"`
		Table   string          `json:"table,omitempty"`
		Version int64           `json:"version,omitempty"`
	}
	errorReply struct {
		Type    string          `json:"type"` // "error"
		ID      json.RawMessage `json:"id,omitempty"`
		Code    string          `json:"code"`
		Message string          `json:"message"`
		Key     string          `json:"key,omitempty"`
		Table   string          `json:"table,omitempty"`
		// Version is the stored version, with code stale_version.
		Version *int64 `json:"version,omitempty"`
	}
	recordsReply struct {
		Type      string          `json:"type"` // "records"
		ID        json.RawMessage `json:"id,omitempty"`
		Table     string          `json:"table"`
		Records   []Entry         `json:"records"`
		Truncated bool            `json:"truncated,omitempty"`
	}
	recordPush struct {
		Type    string          `json:"type"` // "record"
		Key     string          `json:"key"`
		Version int64           `json:"version"`
		Value   json.RawMessage `json:"value"`
	}
	deletedPush struct {
		Type string `json:"type"` // "deleted"
		Key  string `json:"key"`
	}
)

// Error codes of error replies.
const (
	codeBadMessage   = "bad_message"   // not JSON, not text, a field of the wrong type or missing
	codeUnknownType  = "unknown_type"  // no such message type
	codeBadKey       = "bad_key"       // not "table/id", or beyond a limit
	codeBadTable     = "bad_table"     // empty, holds "/", or beyond a limit
	codeBadValue     = "bad_value"     // missing, or JSON that PostgreSQL's jsonb refuses
	codeTooLarge     = "too_large"     // value over Limits.MaxValueBytes
	codeStaleVersion = "stale_version" // version not above the stored one
	codeTooMany      = "too_many"      // over Limits.MaxSubscriptions
	codeRateLimited  = "rate_limited"  // over Limits.MessagesPerSecond
	codeUnavailable  = "unavailable"   // the storage failed or the server is closing
)

// errorCodes are all the codes, for the count of each at /metrics.
var errorCodes = []string{
	codeBadMessage, codeUnknownType, codeBadKey, codeBadTable, codeBadValue, codeTooLarge,
	codeStaleVersion, codeTooMany, codeRateLimited, codeUnavailable,
}

// A protocolError is answered to the client with its code and message.
type protocolError struct {
	code, msg string
	version   *int64
}

func (e *protocolError) Error() string { return e.code + ": " + e.msg }

func errorf(code, format string, args ...any) *protocolError {
	return &protocolError{code: code, msg: fmt.Sprintf(format, args...)}
}

// checkID accepts a request id that is a string or a number, short enough to
// echo.
func checkID(id json.RawMessage) error {
	if len(id) == 0 {
		return nil
	}
	if len(id) > maxIDBytes {
		return errorf(codeBadMessage, "id is %d bytes, over the limit of %d", len(id), maxIDBytes)
	}
	if c := id[0]; c != '"' && c != '-' && (c < '0' || c > '9') {
		return errorf(codeBadMessage, "id must be a string or a number")
	}
	return nil
}

// checkTable refuses a table name that pgstore or PostgreSQL would refuse.
func checkTable(table string) error {
	switch {
	case table == "":
		return errorf(codeBadTable, "table is missing")
	case len(table) > maxTableBytes:
		return errorf(codeBadTable, "table name is %d bytes, over PostgreSQL's limit of %d", len(table), maxTableBytes)
	case strings.Contains(table, "/"):
		return errorf(codeBadTable, "table name must not hold \"/\"")
	case strings.IndexByte(table, 0) >= 0 || !utf8.ValidString(table):
		return errorf(codeBadTable, "table name must be UTF-8 text without NUL")
	}
	return nil
}

// checkKey accepts "table/id": the table is the text before the first "/",
// the id (which may hold "/") the rest. Unlike pgstore, the server has no
// default table: every key names its table.
func checkKey(key string) error {
	if key == "" {
		return errorf(codeBadKey, "key is missing")
	}
	table, id, found := strings.Cut(key, "/")
	if !found {
		return errorf(codeBadKey, "key must be \"table/id\"")
	}
	if err := checkTable(table); err != nil {
		return errorf(codeBadKey, "%s", err.(*protocolError).msg)
	}
	switch {
	case id == "":
		return errorf(codeBadKey, "id (after the first \"/\") is empty")
	case len(id) > pgstore.MaxIDBytes:
		return errorf(codeBadKey, "id is %d bytes, over the limit of %d", len(id), pgstore.MaxIDBytes)
	case strings.IndexByte(id, 0) >= 0 || !utf8.ValidString(id):
		return errorf(codeBadKey, "id must be UTF-8 text without NUL")
	}
	return nil
}

// tableOf returns the table of a checked key.
func tableOf(key string) string {
	table, _, _ := strings.Cut(key, "/")
	return table
}

// storageError turns an error of the storage into what the client is told.
func storageError(op, key string, err error) *protocolError {
	switch {
	case errors.Is(err, pgstore.ErrVersionConflict):
		return errorf(codeStaleVersion, "%s %q: a newer version is stored", op, key)
	case errors.Is(err, pgstore.ErrInvalidKey):
		return errorf(codeBadKey, "%v", err)
	case errors.Is(err, pgstore.ErrInvalidValue):
		return errorf(codeBadValue, "%v", err)
	}
	return errorf(codeUnavailable, "%s %q failed; try again", op, key)
}
