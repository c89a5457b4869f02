// Package connstr turns pgx's connection-string errors into text that does
// not quote the connection string, for the library and the example servers
// alike.
package connstr

import (
	"errors"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
)

// ErrorText returns the text of err with the connection string that a
// pgconn.ParseConfigError quotes left out, lead in its place. pgx masks the
// passwords it recognises there, but only on a best-effort basis: a password
// quoted with an escaped quote ('it\'s secret'), escaped spaces or spaces
// round the "=" (password = x) show in clear. The rest of its message quotes
// no setting's value. An error that is not such a one keeps its text.
func ErrorText(err error, lead string) string {
	text := err.Error()
	var pce *pgconn.ParseConfigError
	if !errors.As(err, &pce) {
		return text
	}
	bare := *pce
	bare.ConnString = ""
	bareText := strings.TrimPrefix(bare.Error(), "cannot parse ``: ")
	return strings.Replace(text, pce.Error(), lead+bareText, 1)
}
