package executor

import (
	"regexp"
	"strings"
)

// masked replaces every secret removed from a text.
const masked = "xxxxx"

var (
	// password=... (also sslpassword=..., and ?password=... in URLs), with
	// a quoted or a bare value.
	kvPasswordRe = regexp.MustCompile(`(?i)(password\s*=\s*)('(?:[^'\\]|\\.)*'?|[^\s&'"]*)`)
	// scheme://user:secret@host
	urlPasswordRe = regexp.MustCompile(`(?i)([a-z][a-z0-9+.\-]*://[^:/?#@\s]*):[^@\s]*@`)
)

// maskDSN hides the passwords in s, which may be a connection string in
// key/value or URL form, or any text (an error message) that contains one.
func maskDSN(s string) string {
	s = kvPasswordRe.ReplaceAllString(s, "${1}"+masked)
	s = urlPasswordRe.ReplaceAllString(s, "${1}:"+masked+"@")
	return s
}

// maskSecret is maskDSN plus the literal removal of a known password (the
// one of the target's connection string), for texts produced by drivers and
// servers that may quote it in ways the patterns do not know. Very short
// passwords are not replaced literally: that would garble the text.
func maskSecret(s, password string) string {
	s = maskDSN(s)
	if len(password) >= 4 {
		s = strings.ReplaceAll(s, password, masked)
	}
	return s
}
