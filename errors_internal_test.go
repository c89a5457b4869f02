package pgstore

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// Every error pgstore returns names pgstore once, at its start, whichever
// sentinel it wraps.
func TestErrorsNamePgstoreOnceAtTheirStart(t *testing.T) {
	for _, err := range []error{
		ErrNotFound, ErrClosed, ErrOutcomeUnknown, ErrVersionConflict, ErrInvalidKey, ErrInvalidValue,
		ErrInvalidCursor, ErrCursorExpired, ErrLogGone, ErrLogStarted, ErrSchemaNotFound, ErrTableNotFound,
	} {
		require.True(t, strings.HasPrefix(err.Error(), "pgstore: "), "sentinel %q", err)
	}
	_, _, keyErr := splitKey("t/", "")
	_, valueErr := encodeValue(nil, 100)
	_, cursorErr := parseCursor("not a cursor")
	for _, err := range []error{
		keyErr, valueErr, cursorErr,
		versionConflict("t", "k", 1, 2),
		versionConflict("t", "k", 1, 0),
	} {
		require.Error(t, err)
		require.True(t, strings.HasPrefix(err.Error(), "pgstore: "), "%q", err)
		require.Equal(t, 1, strings.Count(err.Error(), "pgstore:"), "%q", err)
	}
}
