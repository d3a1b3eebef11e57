<?php

declare(strict_types=1);

namespace PerfexWebhooks;

defined('BASEPATH') or exit('No direct script access allowed');

/**
 * The pipeline's input envelope (SPEC §3.1): id, event, occurred_at, resource_id, data, previous.
 *
 * Perfex's models return rows as objects or arrays of strings; `data` keeps every value a string or
 * null the way Perfex sends them (numbers become strings), objects become JSON objects.
 */
final class Envelope
{
    public static function build(
        string $event,
        string $resourceId,
        array $data,
        ?array $previous = null,
        ?string $id = null,
        ?string $occurredAt = null
    ): array {
        $envelope = [
            'id' => $id ?? self::newId(),
            'event' => $event,
            'occurred_at' => $occurredAt ?? self::now(),
            'resource_id' => $resourceId,
            'data' => self::normalise($data),
        ];
        if ($previous !== null && $previous !== []) {
            $envelope['previous'] = self::normalise($previous);
        }
        return $envelope;
    }

    /** `evt_` + 22 url-safe characters of 16 random bytes, like the pipeline's own ids. */
    public static function newId(): string
    {
        return 'evt_' . rtrim(strtr(base64_encode(random_bytes(16)), '+/', '-_'), '=');
    }

    /** RFC 3339 in UTC with milliseconds, e.g. 2026-11-27T10:00:00.123Z. */
    public static function now(): string
    {
        return (new \DateTimeImmutable('now', new \DateTimeZone('UTC')))->format('Y-m-d\TH:i:s.v\Z');
    }

    /** Objects to arrays, scalars to strings, recursively; null stays null. */
    public static function normalise(mixed $value): mixed
    {
        if (is_object($value)) {
            $value = get_object_vars($value);
        }
        if (is_array($value)) {
            $out = [];
            foreach ($value as $k => $v) {
                $out[$k] = self::normalise($v);
            }
            return $out;
        }
        if ($value === null || is_string($value)) {
            return $value;
        }
        if (is_bool($value)) {
            return $value ? '1' : '0';
        }
        if (is_int($value) || is_float($value)) {
            return (string) $value;
        }
        return null; // resources, closures: nothing a receiver could use
    }

    /** Compact JSON as the pipeline wants it: `data` and `previous` always JSON objects. */
    public static function encode(array $envelope): string
    {
        foreach (['data', 'previous'] as $field) {
            if (array_key_exists($field, $envelope) && $envelope[$field] === []) {
                $envelope[$field] = new \stdClass();
            }
        }
        return json_encode(
            $envelope,
            JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE | JSON_INVALID_UTF8_SUBSTITUTE | JSON_THROW_ON_ERROR
        );
    }

    /** The fields of $old whose value differs in $new (top level, compared as strings). */
    public static function changed(array $old, array $new): array
    {
        $previous = [];
        foreach ($old as $field => $value) {
            if (is_array($value) || is_object($value) || !array_key_exists($field, $new)) {
                continue;
            }
            $now = $new[$field];
            if (is_array($now) || is_object($now)) {
                continue;
            }
            if (($value === null) !== ($now === null) || (string) $value !== (string) $now) {
                $previous[$field] = $value;
            }
        }
        return $previous;
    }
}
