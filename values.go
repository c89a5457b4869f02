package pgstore

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strconv"
	"unicode/utf8"
)

// encodeValue turns a record value into JSON text that jsonb accepts, of at
// most limit bytes.
func encodeValue(v any, limit int) ([]byte, error) {
	var data []byte
	raw := true
	switch v := v.(type) {
	case nil:
		return nil, fmt.Errorf("%w: value is nil; use Delete to remove a record", ErrInvalidValue)
	case json.RawMessage:
		data = v
	case []byte:
		data = v
	default:
		var err error
		if data, err = json.Marshal(v); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrInvalidValue, err)
		}
		raw = false
	}
	if len(data) > limit {
		return nil, fmt.Errorf("%w: value is %d bytes, over the limit of %d (WithMaxValueBytes)", ErrInvalidValue, len(data), limit)
	}
	if err := checkJSONB(data, raw); err != nil {
		return nil, err
	}
	if raw {
		data = bytes.Clone(data) // the caller's bytes are the caller's
	}
	return data, nil
}

// checkJSONB reports why PostgreSQL's jsonb would refuse data: not JSON,
// invalid UTF-8, JSON null, a \u0000 escape or a lone UTF-16 surrogate.
// Marshalled data is known to be valid JSON and UTF-8.
func checkJSONB(data []byte, raw bool) error {
	if raw && !json.Valid(data) {
		if len(data) == 0 {
			return fmt.Errorf("%w: value is empty, not JSON", ErrInvalidValue)
		}
		return fmt.Errorf("%w: not valid JSON", ErrInvalidValue)
	}
	if raw && !utf8.Valid(data) {
		return fmt.Errorf("%w: JSON text is not valid UTF-8", ErrInvalidValue)
	}
	if string(bytes.TrimSpace(data)) == "null" {
		return fmt.Errorf("%w: value is JSON null; use Delete to remove a record", ErrInvalidValue)
	}
	// In valid JSON every backslash starts an escape inside a string.
	for i := bytes.IndexByte(data, '\\'); i >= 0; {
		if data[i+1] == 'u' {
			r, _ := strconv.ParseUint(string(data[i+2:i+6]), 16, 32)
			switch {
			case r == 0:
				return fmt.Errorf("%w: \\u0000 in a string, which jsonb cannot store", ErrInvalidValue)
			case r >= 0xD800 && r < 0xDC00:
				if !isLowSurrogate(data[i+6:]) {
					return fmt.Errorf("%w: \\u%04x is an unpaired UTF-16 surrogate, which jsonb refuses", ErrInvalidValue, r)
				}
				i += 6 // skip the low half as well
			case r >= 0xDC00 && r < 0xE000:
				return fmt.Errorf("%w: \\u%04x is an unpaired UTF-16 surrogate, which jsonb refuses", ErrInvalidValue, r)
			}
			i += 6
		} else {
			i += 2
		}
		next := bytes.IndexByte(data[i:], '\\')
		if next < 0 {
			break
		}
		i += next
	}
	return nil
}

func isLowSurrogate(b []byte) bool {
	if len(b) < 6 || b[0] != '\\' || b[1] != 'u' {
		return false
	}
	r, err := strconv.ParseUint(string(b[2:6]), 16, 32)
	return err == nil && r >= 0xDC00 && r < 0xE000
}
