package pgstore

import (
	"fmt"
	"net/url"
	"os"
	"strings"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgstore/pgstore/internal/connstr"
)

// parseConnString is pgxpool.ParseConfig, for Connect and Check: its errors
// are explained (see connStringError), and TLS files that sslmode=disable
// would ignore are refused (see checkTLSFiles).
func parseConnString(connString string) (*pgxpool.Config, error) {
	cfg, err := pgxpool.ParseConfig(connString)
	if err != nil {
		return nil, connStringError(connString, err)
	}
	if err := checkTLSFiles(connString); err != nil {
		return nil, err
	}
	return cfg, nil
}

// connStringError wraps an error of pgxpool.ParseConfig, explaining the
// cases where pgx's message leaves the fix unclear: a client certificate
// without its key or the reverse (pgx says only that both are required). Its
// text leaves out the connection string (see connstr.ErrorText); errors.As still
// finds pgx's error.
func connStringError(connString string, err error) error {
	text := connstr.ErrorText(err, "cannot parse the connection string: ")
	if strings.Contains(text, `"sslcert" and "sslkey"`) {
		cert := connSetting(connString, "sslcert", "PGSSLCERT")
		key := connSetting(connString, "sslkey", "PGSSLKEY")
		switch {
		case cert != "" && key == "":
			text = fmt.Sprintf("sslcert is set (%q) but sslkey is not: a client certificate needs the file of its private key too; set sslkey: %s", cert, text)
		case key != "" && cert == "":
			text = fmt.Sprintf("sslkey is set (%q) but sslcert is not: a client key needs the file of its certificate too; set sslcert: %s", key, text)
		}
	}
	return &connStringErr{text: "pgstore: " + text, err: err}
}

// connStringErr is an error of connStringError: its own text, wrapping pgx's
// error.
type connStringErr struct {
	text string
	err  error
}

func (e *connStringErr) Error() string { return e.text }
func (e *connStringErr) Unwrap() error { return e.err }

// checkTLSFiles refuses a connection string that names TLS files with
// sslmode=disable, which would connect without TLS and ignore them: the
// files say that TLS was meant. (verify-ca and verify-full without
// sslrootcert verify the server against the system's trust store, as Go
// does, where libpq would read ~/.postgresql/root.crt.)
func checkTLSFiles(connString string) error {
	if connSetting(connString, "sslmode", "PGSSLMODE") != "disable" {
		return nil
	}
	for _, key := range []string{"sslrootcert", "sslcert", "sslkey"} {
		if file := connSetting(connString, key, ""); file != "" {
			return fmt.Errorf("pgstore: sslmode is disable, yet %s is set (%q): the connection would not use TLS and would ignore the file; "+
				"set sslmode to verify-full (or verify-ca, require) to use it, or leave %s out", key, file, key)
		}
	}
	return nil
}

// connSetting returns a setting of a connection string, in URL or
// keyword/value form, or else the environment variable pgx reads for it.
func connSetting(connString, key, env string) string {
	var settings map[string]string
	if strings.HasPrefix(connString, "postgres://") || strings.HasPrefix(connString, "postgresql://") {
		settings = make(map[string]string)
		if _, query, ok := strings.Cut(connString, "?"); ok {
			values, _ := url.ParseQuery(query) // what parses is enough here
			for k, v := range values {
				settings[k] = v[len(v)-1]
			}
		}
	} else {
		settings = keywordValues(connString)
	}
	if v, ok := settings[key]; ok || env == "" {
		return v
	}
	return os.Getenv(env)
}

// keywordValues parses a keyword/value connection string (host=x
// sslkey='a b') as libpq does, as far as it goes.
func keywordValues(s string) map[string]string {
	const space = " \t\n\r\v\f"
	settings := make(map[string]string)
	for {
		s = strings.TrimLeft(s, space)
		key, rest, ok := strings.Cut(s, "=")
		if !ok {
			return settings
		}
		s = strings.TrimLeft(rest, space)
		quoted := strings.HasPrefix(s, "'")
		if quoted {
			s = s[1:]
		}
		var val strings.Builder
		i := 0
		for ; i < len(s); i++ {
			ch := s[i]
			if quoted && ch == '\'' {
				i++
				break
			}
			if !quoted && strings.IndexByte(space, ch) >= 0 {
				break
			}
			if ch == '\\' {
				i++
				if i == len(s) {
					break // as libpq, a trailing backslash ends the value
				}
				ch = s[i]
			}
			val.WriteByte(ch)
		}
		settings[strings.Trim(key, space)] = val.String()
		s = s[i:]
	}
}
