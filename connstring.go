package pgstore

import (
	"fmt"
	"net/url"
	"os"
	"strings"
)

// connStringError wraps an error of pgxpool.ParseConfig, explaining the
// cases where pgx's message leaves the fix unclear: a client certificate
// without its key or the reverse (pgx says only that both are required).
func connStringError(connString string, err error) error {
	if strings.Contains(err.Error(), `"sslcert" and "sslkey"`) {
		cert := connSetting(connString, "sslcert", "PGSSLCERT")
		key := connSetting(connString, "sslkey", "PGSSLKEY")
		switch {
		case cert != "" && key == "":
			return fmt.Errorf("pgstore: sslcert is set (%q) but sslkey is not: a client certificate needs the file of its private key too; set sslkey: %w", cert, err)
		case key != "" && cert == "":
			return fmt.Errorf("pgstore: sslkey is set (%q) but sslcert is not: a client key needs the file of its certificate too; set sslcert: %w", key, err)
		}
	}
	return fmt.Errorf("pgstore: %w", err) // pgx redacts the password
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
	if v, ok := settings[key]; ok {
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
			if ch == '\\' && i+1 < len(s) {
				i++
				ch = s[i]
			}
			val.WriteByte(ch)
		}
		settings[strings.TrimSpace(key)] = val.String()
		s = s[i:]
	}
}
