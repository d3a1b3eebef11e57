<?php

declare(strict_types=1);

namespace PerfexWebhooks;

defined('BASEPATH') or exit('No direct script access allowed');

/**
 * How the module reads Perfex: which model loads a resource, which keys carry a resource's id in a
 * hook's array argument, and which hooks pass the id of another record (a contact, a note, a
 * payment) that leads to the event's resource.
 *
 * Hook argument shapes vary: most hooks pass an id (`after_invoice_added`, $id); some pass an array
 * (`invoice_status_changed`, ['invoice_id' => .., 'status' => ..]; `lead_created`, an id or
 * ['lead_id' => .., 'web_to_lead_form' => true]); some pass an object (`contact_email_verified`,
 * the contact) or two arguments (`note_created`, $id, $data).
 */
final class Resources
{
    /** resource => [model, method] on get_instance(), or ['table', name] read through $CI->db. */
    public const LOADERS = [
        'customer' => ['clients_model', 'get'],
        'contact' => ['clients_model', 'get_contact'],
        'lead' => ['leads_model', 'get'],
        'invoice' => ['invoices_model', 'get'],
        'payment' => ['payments_model', 'get'],
        'credit_note' => ['credit_notes_model', 'get'],
        'estimate' => ['estimates_model', 'get'],
        'proposal' => ['proposals_model', 'get'],
        'contract' => ['contracts_model', 'get'],
        'subscription' => ['subscriptions_model', 'get_by_id'],
        'item' => ['invoice_items_model', 'get'],
        'expense' => ['expenses_model', 'get'],
        'project' => ['projects_model', 'get'],
        'task' => ['tasks_model', 'get'],
        'ticket' => ['tickets_model', 'get'],
        'staff' => ['staff_model', 'get'],
        'knowledge_base' => ['knowledge_base_model', 'get'],
        'timesheet' => ['table', 'taskstimers'],
        'note' => ['table', 'notes'],
        'checklist_item' => ['table', 'task_checklist_items'],
    ];

    /** Keys that carry a resource's id in a hook's array argument, most specific first. */
    public const ID_KEYS = [
        'customer' => ['customer_id', 'client_id', 'clientid', 'userid'],
        'contact' => ['contact_id', 'contactid'],
        'lead' => ['lead_id', 'leadid'],
        'invoice' => ['invoice_id', 'invoiceid'],
        'payment' => ['payment_id', 'paymentid'],
        'credit_note' => ['credit_note_id', 'credit_noteid'],
        'estimate' => ['estimate_id', 'estimateid'],
        'proposal' => ['proposal_id', 'proposalid'],
        'contract' => ['contract_id', 'contractid'],
        'subscription' => ['subscription_id'],
        'item' => ['item_id', 'itemid'],
        'expense' => ['expense_id', 'expenseid'],
        'project' => ['project_id', 'projectid'],
        'task' => ['task_id', 'taskid'],
        'timesheet' => ['timer_id', 'timesheet_id'],
        'ticket' => ['ticket_id', 'ticketid'],
        'staff' => ['staff_id', 'staffid'],
        'note' => ['note_id'],
        'knowledge_base' => ['article_id', 'articleid'],
        'checklist_item' => ['checklist_id', 'listid'],
    ];

    /** Hooks whose id argument is another record than the event's resource. */
    public const HOOK_SUBJECT = [
        'contact_created' => 'contact',
        'contact_updated' => 'contact',
        'before_delete_contact' => 'contact',
        'contact_deleted' => 'contact',
        'contact_status_changed' => 'contact',
        'contact_email_verified' => 'contact',
        'note_created' => 'note',
        'before_update_note' => 'note',
        'note_updated' => 'note',
        'before_delete_note' => 'note',
        'note_deleted' => 'note',
        'after_payment_added' => 'payment',
        'after_payment_updated' => 'payment',
        'before_payment_deleted' => 'payment',
        'after_payment_deleted' => 'payment',
        'task_checklist_item_finished' => 'checklist_item',
    ];

    /**
     * Perfex core's spelling of a hook the catalog names differently: the module listens to both
     * (the same change reported twice in one request is sent once).
     */
    public const HOOK_ALIASES = [
        'after_client_created' => ['after_client_added'],
        'client_updated' => ['after_client_updated'],
        'invoice_updated' => ['after_invoice_updated'],
    ];

    /** subject => [event resource => the subject's field holding that resource's id]. */
    public const PARENT = [
        'contact' => ['customer' => 'userid'],
        'note' => ['customer' => 'rel_id', 'lead' => 'rel_id'],
        'payment' => ['invoice' => 'invoiceid'],
        'checklist_item' => ['task' => 'taskid'],
    ];

    private object $ci;

    public function __construct(object $ci)
    {
        $this->ci = $ci;
    }

    /** The record through Perfex's model (or table), as an array; null if it is gone. */
    public function load(string $resource, string $id): ?array
    {
        [$model, $method] = self::LOADERS[$resource] ?? [null, null];
        if ($model === null) {
            return null;
        }
        if ($model === 'table') {
            $row = $this->ci->db->where('id', $id)->get(db_prefix() . $method)->row_array();
        } else {
            if (!isset($this->ci->{$model})) {
                $this->ci->load->model($model);
            }
            $row = $this->ci->{$model}->{$method}($id);
        }
        if (is_object($row)) {
            $row = get_object_vars($row);
        }
        return is_array($row) && $row !== [] ? $row : null;
    }

    /** The id a hook's arguments give for `$resource`, or null. */
    public static function idFrom(string $resource, array $args): ?string
    {
        $first = $args[0] ?? null;
        if (is_scalar($first) && !is_bool($first)) {
            $id = trim((string) $first);
            return $id === '' ? null : $id;
        }
        if (is_object($first)) {
            $first = get_object_vars($first);
        }
        if (!is_array($first)) {
            return null;
        }
        foreach ([...(self::ID_KEYS[$resource] ?? []), 'id'] as $key) {
            $value = $first[$key] ?? null;
            if (is_scalar($value) && !is_bool($value) && trim((string) $value) !== '') {
                return trim((string) $value);
            }
        }
        return null;
    }

    /** A field from the hook's array or object arguments (first hit wins). */
    public static function argField(string $field, array $args): mixed
    {
        foreach ($args as $arg) {
            if (is_object($arg)) {
                $arg = get_object_vars($arg);
            }
            if (is_array($arg) && array_key_exists($field, $arg) && !is_array($arg[$field])) {
                return $arg[$field];
            }
        }
        return null;
    }
}
