package pgstore

import (
	"net/url"
	"strings"
)

// passwordMask replaces passwords in DSNs, logs and errors.
const passwordMask = "xxxxx"

// MaskDSN returns dsn with its passwords replaced by "xxxxx", in both libpq
// forms: key/value (password=secret, password='quoted \' secret',
// sslpassword=...) and URL (postgres://user:secret@host/db?password=secret).
// Use it in every log line and error that mentions a DSN.
func MaskDSN(dsn string) string {
	out, _ := scanDSN(dsn)
	return out
}

// dsnPasswords returns the passwords written in dsn, raw and decoded, so
// they can be scrubbed from driver error texts.
func dsnPasswords(dsn string) []string {
	_, pws := scanDSN(dsn)
	return pws
}

func scanDSN(dsn string) (masked string, passwords []string) {
	if strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://") {
		return scanURL(dsn)
	}
	return scanKV(dsn)
}

func isPasswordKey(k string) bool {
	return strings.EqualFold(k, "password") || strings.EqualFold(k, "sslpassword")
}

func isSpace(c byte) bool {
	return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'
}

// scanKV walks a libpq key/value string (key = value, values optionally
// single-quoted with backslash escapes) and masks password values. A
// malformed tail after a password key is masked entirely.
func scanKV(s string) (string, []string) {
	var b strings.Builder
	var pws []string
	i := 0
	for i < len(s) {
		if isSpace(s[i]) {
			b.WriteByte(s[i])
			i++
			continue
		}
		start := i
		for i < len(s) && s[i] != '=' && !isSpace(s[i]) {
			i++
		}
		key := s[start:i]
		b.WriteString(key)
		j := i
		for j < len(s) && isSpace(s[j]) {
			j++
		}
		if j >= len(s) || s[j] != '=' {
			b.WriteString(s[i:j])
			i = j
			continue
		}
		b.WriteString(s[i : j+1])
		i = j + 1
		for i < len(s) && isSpace(s[i]) {
			b.WriteByte(s[i])
			i++
		}
		vstart := i
		var val strings.Builder
		if i < len(s) && s[i] == '\'' {
			i++
			for i < len(s) {
				if s[i] == '\\' && i+1 < len(s) {
					val.WriteByte(s[i+1])
					i += 2
					continue
				}
				if s[i] == '\'' {
					i++
					break
				}
				val.WriteByte(s[i])
				i++
			}
		} else {
			for i < len(s) && !isSpace(s[i]) {
				if s[i] == '\\' && i+1 < len(s) {
					val.WriteByte(s[i+1])
					i += 2
					continue
				}
				val.WriteByte(s[i])
				i++
			}
		}
		if i > len(s) {
			i = len(s)
		}
		raw := s[vstart:i]
		if isPasswordKey(key) {
			b.WriteString(passwordMask)
			pws = append(pws, raw, val.String())
		} else {
			b.WriteString(raw)
		}
	}
	return b.String(), pws
}

// scanURL masks the userinfo password and password query parameters of a
// postgres:// URL. The authority ends at the first '/' (neither libpq nor
// net/url accept an unescaped '/' in a password); within it, userinfo ends
// at the last '@'.
func scanURL(s string) (string, []string) {
	var pws []string
	sep := strings.Index(s, "://") + 3
	head, rest := s[:sep], s[sep:]
	auth, tail := rest, ""
	slash := strings.IndexByte(rest, '/')
	if slash >= 0 {
		auth, tail = rest[:slash], rest[slash:]
	}
	userinfo, hostpart := "", auth
	if at := strings.LastIndexByte(auth, '@'); at >= 0 {
		userinfo, hostpart = auth[:at+1], auth[at+1:]
	}
	if slash < 0 {
		if q := strings.IndexByte(hostpart, '?'); q >= 0 {
			hostpart, tail = hostpart[:q], hostpart[q:]
		}
	}
	if c := strings.IndexByte(userinfo, ':'); c >= 0 {
		pw := userinfo[c+1 : len(userinfo)-1]
		pws = append(pws, pw)
		if dec, err := url.PathUnescape(pw); err == nil {
			pws = append(pws, dec)
		}
		userinfo = userinfo[:c+1] + passwordMask + "@"
	}
	path, query, hasQuery := strings.Cut(tail, "?")
	if !hasQuery {
		return head + userinfo + hostpart + tail, pws
	}
	frag := ""
	if h := strings.IndexByte(query, '#'); h >= 0 {
		query, frag = query[:h], query[h:]
	}
	parts := strings.Split(query, "&")
	for n, p := range parts {
		k, v, ok := strings.Cut(p, "=")
		if !ok {
			continue
		}
		key, err := url.QueryUnescape(k)
		if err != nil {
			key = k
		}
		if isPasswordKey(key) {
			pws = append(pws, v)
			if dec, err := url.QueryUnescape(v); err == nil {
				pws = append(pws, dec)
			}
			parts[n] = k + "=" + passwordMask
		}
	}
	return head + userinfo + hostpart + path + "?" + strings.Join(parts, "&") + frag, pws
}
